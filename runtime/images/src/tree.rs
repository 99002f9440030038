//! Building an image's entry list from a source, entry by entry, with the
//! rules every source obeys; and, for OCI images, applying layers in order
//! with whiteouts and opaque directories.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use provd_domain::image::{Entry, EntryKind, Hash, parent};

use crate::{ImportError, ImportLimits};

/// Accumulates entries and refuses any that would make the tree ambiguous
/// or unsafe: duplicates, entries under a non-directory, hard links to
/// anything but an earlier file.
pub(crate) struct TreeBuilder {
    reference: String,
    entries: BTreeMap<String, Entry>,
    limits: ImportLimits,
    content_bytes: u64,
    /// Paths added by the current layer; a path may appear once per layer.
    layer_seen: HashSet<String>,
}

impl TreeBuilder {
    pub(crate) fn new(reference: String, limits: ImportLimits) -> TreeBuilder {
        TreeBuilder {
            reference,
            entries: BTreeMap::new(),
            limits,
            content_bytes: 0,
            layer_seen: HashSet::new(),
        }
    }

    pub(crate) fn entry_error(&self, path: &str, problem: impl Into<String>) -> ImportError {
        ImportError::Entry {
            reference: self.reference.clone(),
            entry: shortened(path),
            problem: problem.into(),
        }
    }

    /// Starts the next layer: its entries may replace those of earlier ones.
    pub(crate) fn begin_layer(&mut self) {
        self.layer_seen.clear();
    }

    /// Checks an entry before its content is read: count, size, parents,
    /// duplicates.
    pub(crate) fn check(&self, path: &str, size: u64) -> Result<(), ImportError> {
        if self.entries.len() as u64 >= self.limits.max_entries {
            return Err(ImportError::Limit {
                reference: self.reference.clone(),
                what: "entries".into(),
                limit: self.limits.max_entries,
            });
        }
        if size > self.limits.max_file_bytes {
            return Err(self.entry_error(
                path,
                format!("is {size} bytes; files may be at most {}", self.limits.max_file_bytes),
            ));
        }
        if self.content_bytes.saturating_add(size) > self.limits.max_content_bytes {
            return Err(ImportError::Limit {
                reference: self.reference.clone(),
                what: "bytes of file content".into(),
                limit: self.limits.max_content_bytes,
            });
        }
        if self.layer_seen.contains(path) {
            return Err(self.entry_error(path, "appears twice in the image"));
        }
        // Lower layers count too: a layer may not write through a symlink
        // an earlier layer planted.
        let mut ancestor = parent(path);
        while let Some(dir) = ancestor {
            if let Some(e) = self.entries.get(dir)
                && e.kind != EntryKind::Dir
            {
                return Err(self.entry_error(
                    path,
                    format!("its parent {dir} is a {}, not a directory", e.kind.as_str()),
                ));
            }
            ancestor = parent(dir);
        }
        Ok(())
    }

    /// Adds a checked entry. Over an entry of an earlier layer, a directory
    /// replaces a directory's metadata and keeps its children; anything else
    /// replaces the whole subtree.
    pub(crate) fn push(&mut self, entry: Entry) {
        let keep_children = self
            .entries
            .get(&entry.path)
            .is_some_and(|old| old.kind == EntryKind::Dir && entry.kind == EntryKind::Dir);
        if keep_children {
            self.remove_one(&entry.path);
        } else {
            self.remove_subtree(&entry.path, false);
        }
        if entry.kind == EntryKind::File {
            self.content_bytes += entry.size;
        }
        self.layer_seen.insert(entry.path.clone());
        self.entries.insert(entry.path.clone(), entry);
    }

    fn remove_one(&mut self, path: &str) {
        if let Some(old) = self.entries.remove(path)
            && old.kind == EntryKind::File
        {
            self.content_bytes = self.content_bytes.saturating_sub(old.size);
        }
    }

    /// Removes `path` and everything under it (or only what is under it);
    /// entries the current layer added are kept when `lower_only`.
    fn remove_subtree(&mut self, path: &str, lower_only: bool) {
        // The image root has no entry of its own; everything is under it.
        let prefix = if path.is_empty() { String::new() } else { format!("{path}/") };
        let mut doomed: Vec<String> = self
            .entries
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        if !lower_only && !path.is_empty() {
            doomed.push(path.to_string());
        }
        for p in doomed {
            if lower_only && self.layer_seen.contains(&p) {
                continue;
            }
            self.remove_one(&p);
        }
    }

    /// An OCI whiteout `.wh.<name>` at `path`'s place: hides `path` and its
    /// subtree from lower layers.
    pub(crate) fn whiteout(&mut self, path: &str) {
        self.remove_subtree(path, false);
    }

    /// An OCI opaque marker in `dir`: hides everything lower layers put
    /// under it; this layer's own entries stay.
    pub(crate) fn opaque(&mut self, dir: &str) {
        self.remove_subtree(dir, true);
    }

    /// The content of the file a hard link at `path` names.
    pub(crate) fn hardlink_target(
        &self,
        path: &str,
        target: &str,
    ) -> Result<(Hash, u64), ImportError> {
        match self.entries.get(target) {
            Some(e) if matches!(e.kind, EntryKind::File | EntryKind::Hardlink) => {
                e.hash.map(|h| (h, e.size)).ok_or_else(|| {
                    self.entry_error(path, format!("hard link to {target}, which has no content"))
                })
            }
            Some(e) => Err(self.entry_error(
                path,
                format!("hard link to {target}, which is a {}", e.kind.as_str()),
            )),
            None => Err(self.entry_error(
                path,
                format!("hard link to {target}, which is not an earlier file of this image"),
            )),
        }
    }

    /// The entries in path order, with directories the source implied but
    /// never listed (`a/b/c` without `a/` and `a/b/`) added as root-owned
    /// 0755.
    pub(crate) fn finish(mut self) -> Vec<Entry> {
        let mut implied = BTreeSet::new();
        for path in self.entries.keys() {
            let mut ancestor = parent(path);
            while let Some(dir) = ancestor {
                if self.entries.contains_key(dir) || !implied.insert(dir.to_string()) {
                    break;
                }
                ancestor = parent(dir);
            }
        }
        for dir in implied {
            self.entries.insert(dir.clone(), Entry::implied_dir(dir));
        }
        self.entries.into_values().collect()
    }
}

/// Longest entry name quoted whole in an error; a hostile archive's names
/// may be kilobytes long, and errors travel to logs and API answers.
const MAX_SHOWN_NAME_BYTES: usize = 256;

/// `path`, or its first [`MAX_SHOWN_NAME_BYTES`] (at a character
/// boundary) followed by `…` and its length.
fn shortened(path: &str) -> String {
    if path.len() <= MAX_SHOWN_NAME_BYTES {
        return path.to_string();
    }
    let end = path.floor_char_boundary(MAX_SHOWN_NAME_BYTES);
    format!("{}… ({} bytes)", path.get(..end).unwrap_or_default(), path.len())
}
