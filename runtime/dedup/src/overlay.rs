//! What a guest sees through its overlay root, computed from manifests.
//!
//! A VM's root is an overlay: its layers read-only below, its private set
//! writable on top. The rules modelled here are the kernel's:
//!
//! - a layer hides, at each of its paths, what the layers below hold there;
//!   a file (anything but a directory) hides a lower directory's whole tree;
//! - a layer's files sit in directories the layer implies; such a directory
//!   hides a lower file at its path and merges with a lower directory;
//! - the private set lies on top; its whiteouts hide a path and everything
//!   below it.
//!
//! Layers never hold directories (see the crate's documentation), so a
//! directory only a layer implies shows as root-owned 0755. A plan puts in
//! the private set, whose metadata wins, each directory of an image that
//! its layers do not show with its mode and owner, and each directory an
//! entry of the private set or a whiteout sits in: the private partition
//! must hold those folders for its own entries.

use std::collections::{BTreeMap, HashSet};

use provd_domain::image::{Entry, EntryKind};

use crate::{FileKey, Plan, VmShare, file_bytes, sorted};

/// Where a path of a view comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The entry at `entry` of the layer at `layer` in the stack (bottom
    /// is 0).
    Layer { layer: usize, entry: usize },
    /// A directory the layer at this index implies.
    Implied(usize),
    /// The private set.
    Private,
}

#[derive(Debug, Clone)]
struct Slot {
    entry: Entry,
    source: Source,
}

/// The entries a guest sees, by path.
#[derive(Debug, Clone, Default)]
pub struct VmView {
    slots: BTreeMap<String, Slot>,
}

/// The ancestors of a path, outermost first: `a/b/c` gives `a`, `a/b`.
fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/').filter_map(move |(i, _)| path.get(..i))
}

/// Removes `path` and everything below it from a map keyed by path.
pub fn remove_tree<V>(map: &mut BTreeMap<String, V>, path: &str) {
    map.remove(path);
    // Every path below `p` sorts in [`p/`, `p0`): `0` follows `/`.
    let below: Vec<String> =
        map.range(format!("{path}/")..format!("{path}0")).map(|(k, _)| k.clone()).collect();
    for k in below {
        map.remove(&k);
    }
}

/// Puts `value` at `path` of a map keyed by path on top of what is there,
/// as an overlay layer would: a directory merges with a lower directory and
/// hides a lower file at its path; anything else hides what lies at and
/// below its path. `is_dir` tells what a value already there is.
pub fn place<V>(
    map: &mut BTreeMap<String, V>,
    path: &str,
    dir: bool,
    value: V,
    is_dir: impl Fn(&V) -> bool,
) {
    if dir {
        if map.get(path).is_some_and(|v| !is_dir(v)) {
            map.remove(path);
        }
    } else {
        remove_tree(map, path);
    }
    map.insert(path.to_string(), value);
}

impl VmView {
    fn place(&mut self, entry: Entry, source: Source) {
        let (path, dir) = (entry.path.clone(), entry.kind == EntryKind::Dir);
        place(&mut self.slots, &path, dir, Slot { entry, source }, |s| {
            s.entry.kind == EntryKind::Dir
        });
    }

    /// The layer (and its entry) that shows `e` exactly as it is (path,
    /// type, mode, owner, content, link target, device; directories are
    /// never given by a layer).
    pub fn layer_giving(&self, e: &Entry) -> Option<(usize, usize)> {
        match self.slots.get(&e.path) {
            Some(Slot { entry, source: Source::Layer { layer, entry: at } })
                if e.kind != EntryKind::Dir && FileKey::of(entry) == FileKey::of(e) =>
            {
                Some((*layer, *at))
            }
            _ => None,
        }
    }

    /// Whether a layer shows directory `e` with its mode and owner (its
    /// modification time is not compared, as for files).
    pub fn layer_gives_dir(&self, e: &Entry) -> bool {
        match self.slots.get(&e.path) {
            Some(Slot { entry, source: Source::Layer { .. } | Source::Implied(_) }) => {
                e.kind == EntryKind::Dir
                    && entry.kind == EntryKind::Dir
                    && entry.mode & 0o7777 == e.mode & 0o7777
                    && (entry.uid, entry.gid) == (e.uid, e.gid)
            }
            _ => false,
        }
    }

    /// Every entry, in path order.
    pub fn entries(&self) -> Vec<Entry> {
        self.slots.values().map(|s| s.entry.clone()).collect()
    }
}

/// The folders the entries of `private` and the `whiteouts` sit in that
/// `private` does not hold, outermost first: what a private partition must
/// hold beside them.
fn unheld_folders<'a>(private: &'a [Entry], whiteouts: &'a [String]) -> Vec<&'a str> {
    let held: HashSet<&str> = private.iter().map(|e| e.path.as_str()).collect();
    let mut folders: Vec<&str> = private
        .iter()
        .map(|e| e.path.as_str())
        .chain(whiteouts.iter().map(String::as_str))
        .flat_map(ancestors)
        .filter(|a| !held.contains(a))
        .collect();
    folders.sort_unstable();
    folders.dedup();
    folders
}

/// The view of `lowers` (bottom first) under `private` with `whiteouts`.
pub fn overlay_view(lowers: &[&[Entry]], private: &[Entry], whiteouts: &[String]) -> VmView {
    let mut view = VmView::default();
    for (i, layer) in lowers.iter().enumerate() {
        let mut dirs: Vec<&str> = layer.iter().flat_map(|e| ancestors(&e.path)).collect();
        dirs.sort_unstable();
        dirs.dedup();
        for d in dirs {
            view.place(Entry::implied_dir(d), Source::Implied(i));
        }
        for (at, e) in layer.iter().enumerate() {
            view.place(e.clone(), Source::Layer { layer: i, entry: at });
        }
    }
    for w in whiteouts {
        remove_tree(&mut view.slots, w);
    }
    // Parents before children, so a directory never hides its own files.
    let mut own: Vec<&Entry> = private.iter().collect();
    own.sort_by(|a, b| a.path.cmp(&b.path));
    // The partition writer makes each folder a private entry or a whiteout
    // sits in that the set does not hold, as a root-owned 0755 directory;
    // in the overlay, that upper folder's metadata wins.
    for d in unheld_folders(private, whiteouts) {
        view.place(Entry::implied_dir(d), Source::Private);
    }
    for e in own {
        view.place(e.clone(), Source::Private);
    }
    view
}

/// A VM's layout on a stack of layers: what its private set must hold,
/// where it hides what its layers hold, and which entries of each layer it
/// sees.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmLayout {
    /// Every entry of the image its layers do not show exactly as the
    /// image has it, and every directory of the image the private
    /// partition must hold for those and for the whiteouts; path order.
    pub private: Vec<Entry>,
    /// The outermost paths its layers hold that the image lacks.
    pub whiteouts: Vec<String>,
    /// Per layer of the stack (bottom first), the indices of its entries
    /// the VM sees.
    pub used: Vec<Vec<usize>>,
    /// Regular-file bytes of the image each layer gives, per layer.
    pub given_bytes: Vec<u64>,
    pub image_bytes: u64,
    pub private_bytes: u64,
}

/// The layout of a VM whose image is `image` (by path) on `lowers`
/// (bottom first): what the layers show exactly as the image has it stays
/// with them (a directory: its mode and owner), every other entry of the
/// image goes to the private set with the image's directories it sits in,
/// and what the layers show that the image lacks is hidden by a whiteout
/// at its outermost path, whose folders go to the private set too.
pub fn vm_layout(lowers: &[&[Entry]], image: &BTreeMap<String, Entry>) -> VmLayout {
    let view = overlay_view(lowers, &[], &[]);
    let mut layout = VmLayout {
        used: vec![Vec::new(); lowers.len()],
        given_bytes: vec![0; lowers.len()],
        ..VmLayout::default()
    };
    for e in image.values() {
        layout.image_bytes += file_bytes(e);
        if e.kind == EntryKind::Dir {
            // Decided below, once what the private set holds is known.
            if !view.layer_gives_dir(e) {
                layout.private.push(e.clone());
            }
            continue;
        }
        match view.layer_giving(e) {
            Some((i, at)) => {
                if let Some(used) = layout.used.get_mut(i) {
                    used.push(at);
                }
                if let Some(b) = layout.given_bytes.get_mut(i) {
                    *b += file_bytes(e);
                }
            }
            None => {
                layout.private_bytes += file_bytes(e);
                layout.private.push(e.clone());
            }
        }
    }
    let mut hidden: HashSet<&str> = HashSet::new();
    for path in view.slots.keys() {
        // An image without an entry for a directory its files sit in
        // still needs that directory.
        if image.contains_key(path)
            || image.range(format!("{path}/")..format!("{path}0")).next().is_some()
        {
            continue;
        }
        let covered = ancestors(path)
            .any(|a| hidden.contains(a) || image.get(a).is_some_and(|e| e.kind != EntryKind::Dir));
        if !covered {
            hidden.insert(path);
            layout.whiteouts.push(path.clone());
        }
    }
    // The image's folders of what the private set holds and of the
    // whiteouts: the partition holds them, with the image's metadata.
    let folders: Vec<Entry> = unheld_folders(&layout.private, &layout.whiteouts)
        .into_iter()
        .filter_map(|a| image.get(a).filter(|d| d.kind == EntryKind::Dir).cloned())
        .collect();
    layout.private.extend(folders);
    for used in layout.used.iter_mut() {
        used.sort_unstable();
    }
    layout.private = sorted(layout.private);
    layout
}

/// Sets each VM's private set, whiteouts and byte shares from its stack and
/// its image (see [`vm_layout`]).
pub(crate) fn finish(plan: &mut Plan, images: &BTreeMap<String, BTreeMap<String, Entry>>) {
    let vms: Vec<String> = plan.stacks.keys().cloned().collect();
    plan.whiteouts.clear();
    plan.shares.clear();
    for vm in vms {
        let Some(image) = images.get(&vm) else { continue };
        let stack: Vec<&crate::PlannedLayer> = plan
            .stacks
            .get(&vm)
            .into_iter()
            .flatten()
            .filter_map(|id| plan.layers.iter().find(|l| &l.id == id))
            .collect();
        let lowers: Vec<&[Entry]> = stack.iter().map(|l| l.entries.as_slice()).collect();
        let layout = vm_layout(&lowers, image);
        let mut share = VmShare {
            image_bytes: layout.image_bytes,
            private_bytes: layout.private_bytes,
            whiteouts: layout.whiteouts.len() as u64,
            ..VmShare::default()
        };
        for (layer, bytes) in stack.iter().zip(&layout.given_bytes) {
            if layer.node.is_some() {
                share.node_bytes += bytes;
            } else {
                share.new_shared_bytes += bytes;
            }
        }
        plan.private_bytes.insert(vm.clone(), share.private_bytes);
        plan.private.insert(vm.clone(), layout.private);
        if !layout.whiteouts.is_empty() {
            plan.whiteouts.insert(vm.clone(), layout.whiteouts);
        }
        plan.shares.insert(vm, share);
    }
    plan.stored_bytes = plan.layer_bytes + plan.private_bytes.values().sum::<u64>();
}

#[cfg(test)]
mod tests {
    use super::*;
    use provd_domain::image::Hash;

    fn file(path: &str, byte: u8) -> Entry {
        Entry {
            path: path.into(),
            kind: EntryKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            size: 10,
            hash: Some(Hash([byte; 32])),
            link_target: None,
            device: None,
        }
    }

    fn symlink(path: &str, target: &str) -> Entry {
        Entry {
            kind: EntryKind::Symlink,
            size: 0,
            hash: None,
            link_target: Some(target.into()),
            ..file(path, 0)
        }
    }

    fn paths(v: &VmView) -> Vec<String> {
        v.entries().into_iter().map(|e| format!("{}:{}", e.path, e.kind.as_str())).collect()
    }

    #[test]
    fn a_file_hides_a_lower_tree_and_an_implied_directory_hides_a_lower_file() {
        let low = [symlink("bin", "usr/bin"), file("etc/a", 1)];
        let high = [file("bin/sh", 2), file("etc", 3)];
        let v = overlay_view(&[&low, &high], &[], &[]);
        assert_eq!(paths(&v), ["bin:dir", "bin/sh:file", "etc:file"]);
        assert_eq!(v.slots.get("bin").map(|s| s.source), Some(Source::Implied(1)));
    }

    #[test]
    fn whiteouts_hide_a_path_and_its_tree_and_private_entries_win() {
        let low = [file("a/b/c", 1), file("a/d", 2), file("e", 3)];
        let private = [Entry::implied_dir("a"), file("e", 4)];
        let v = overlay_view(&[&low], &private, &["a/b".to_string()]);
        assert_eq!(paths(&v), ["a:dir", "a/d:file", "e:file"]);
        assert_eq!(v.slots.get("e").and_then(|s| s.entry.hash), Some(Hash([4; 32])));
        assert_eq!(v.slots.get("e").map(|s| s.source), Some(Source::Private));
    }
}
