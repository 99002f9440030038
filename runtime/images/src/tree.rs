//! Building an image's entry list from a source, entry by entry, with the
//! rules every source obeys.

use std::collections::HashMap;

use provd_domain::image::{Entry, EntryKind, Hash, parent};

use crate::{ImportError, ImportLimits};

/// Accumulates entries and refuses any that would make the tree ambiguous
/// or unsafe: duplicates, entries under a non-directory, hard links to
/// anything but an earlier file.
pub(crate) struct TreeBuilder {
    reference: String,
    entries: Vec<Entry>,
    index: HashMap<String, usize>,
    limits: ImportLimits,
    content_bytes: u64,
}

impl TreeBuilder {
    pub(crate) fn new(reference: String, limits: ImportLimits) -> TreeBuilder {
        TreeBuilder {
            reference,
            entries: Vec::new(),
            index: HashMap::new(),
            limits,
            content_bytes: 0,
        }
    }

    pub(crate) fn entry_error(&self, path: &str, problem: impl Into<String>) -> ImportError {
        ImportError::Entry {
            reference: self.reference.clone(),
            entry: path.to_string(),
            problem: problem.into(),
        }
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
        if self.index.contains_key(path) {
            return Err(self.entry_error(path, "appears twice in the image"));
        }
        let mut ancestor = parent(path);
        while let Some(dir) = ancestor {
            if let Some(&i) = self.index.get(dir)
                && let Some(e) = self.entries.get(i)
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

    /// Adds a checked entry.
    pub(crate) fn push(&mut self, entry: Entry) {
        if entry.kind == EntryKind::File {
            self.content_bytes += entry.size;
        }
        self.index.insert(entry.path.clone(), self.entries.len());
        self.entries.push(entry);
    }

    /// The content of the file a hard link at `path` names.
    pub(crate) fn hardlink_target(
        &self,
        path: &str,
        target: &str,
    ) -> Result<(Hash, u64), ImportError> {
        match self.index.get(target).and_then(|&i| self.entries.get(i)) {
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

    /// The entries, with directories the source implied but never listed
    /// (`a/b/c` without `a/` and `a/b/`) added as root-owned 0755.
    pub(crate) fn finish(mut self) -> Vec<Entry> {
        let mut implied = std::collections::BTreeSet::new();
        for e in &self.entries {
            let mut ancestor = parent(&e.path);
            while let Some(dir) = ancestor {
                if self.index.contains_key(dir) || !implied.insert(dir.to_string()) {
                    break;
                }
                ancestor = parent(dir);
            }
        }
        for dir in implied {
            self.index.insert(dir.clone(), self.entries.len());
            self.entries.push(Entry {
                path: dir,
                kind: EntryKind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime: 0,
                size: 0,
                hash: None,
                link_target: None,
                device: None,
            });
        }
        self.entries
    }
}
