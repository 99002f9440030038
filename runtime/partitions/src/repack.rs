//! Repack: one new shared partition for the layers VMs use, holding only
//! the entries they see.
//!
//! VMs come and go one request at a time, so layers fragment: a VM stacks
//! layers of several shared partitions, layers hold entries that every VM
//! stacking them hides, and partitions stay for one layer still in use.
//! A repack plans one new shared partition for a set of VMs: each layer
//! they stack, cut down to the entries at least one of them sees (the
//! identical content of several layers is stored once there). Each VM's
//! view stays exactly what it was: it is recomputed from its image and its
//! stack and compared before anything is built, and where cutting a layer
//! would change what some VM sees, that layer is kept whole. Moving a VM
//! rewrites only the boot files of its private partition (`provd/`), never
//! what its guest wrote, so a VM is moved while it is stopped.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use provd_dedup::{Plan, PlannedLayer, Policy, overlay_view, vm_layout};
use provd_domain::image::Entry;
use provd_store::{PartitionFormat, PartitionRecord, PartitionRole, StackedLayer, Store};

use crate::customize::{read_ext4, sparse_copy};
use crate::tools::DEBUGFS;
use crate::{
    BuildOptions, PartitionError, PrivateManifest, SharedRef, StackItem, VmImage, layer_digest,
};

/// A VM a repack moves.
#[derive(Debug, Clone)]
pub struct Move {
    pub vm: String,
    pub private: PartitionRecord,
    pub manifest: PrivateManifest,
    /// Its stack before.
    pub from: Vec<StackedLayer>,
}

/// What a repack would build and move.
#[derive(Debug, Clone)]
pub struct RepackPlan {
    /// The new shared partition's layers, with every moved VM's stack and
    /// private set (checked against its image when built).
    pub plan: Plan,
    pub vms: Vec<VmImage>,
    pub moves: Vec<Move>,
    /// VMs left where they are, with the reason.
    pub skipped: Vec<(String, String)>,
    /// Layers (source partition, layer) kept whole because cutting them
    /// would change what a VM sees.
    pub kept_whole: Vec<(String, String)>,
    /// The trust domain of the new shared partition: `public` when every
    /// moved VM stacks only public layers, else the one tenant's domain
    /// they all stack. A repack never mixes domains: a VM whose stack is of
    /// another domain than the first moved VM's is left where it is.
    pub domain: String,
}

type Key = (String, String);

fn without_mtime(entries: Vec<Entry>) -> Vec<Entry> {
    entries.into_iter().map(|e| Entry { mtime: 0, ..e }).collect()
}

/// Plans a repack of `only` (every VM with a private partition when
/// `None`).
pub fn plan_repack(store: &Store, only: Option<&[String]>) -> Result<RepackPlan, PartitionError> {
    let mut skipped = Vec::new();
    let privates: Vec<PartitionRecord> =
        store.partitions()?.into_iter().filter(|p| p.role == PartitionRole::Private).collect();
    let mut chosen: Vec<(String, PartitionRecord)> = Vec::new();
    match only {
        Some(names) => {
            for name in names {
                match privates.iter().find(|p| p.vms.iter().any(|v| v == name)) {
                    Some(p) => chosen.push((name.clone(), p.clone())),
                    None => skipped.push((name.clone(), "it has no private partition".into())),
                }
            }
        }
        None => {
            for p in &privates {
                if let Some(vm) = p.vms.first() {
                    chosen.push((vm.clone(), p.clone()));
                }
            }
        }
    }
    chosen.sort_by(|a, b| a.0.cmp(&b.0));
    chosen.dedup_by(|a, b| a.0 == b.0);

    let pending: BTreeSet<String> =
        store.pending_restacks()?.into_iter().map(|(private, _)| private).collect();
    let layers = store.layers(false)?;
    let recorded: BTreeSet<Key> = layers
        .iter()
        .filter(|l| l.recorded)
        .map(|l| (l.partition.clone(), l.name.clone()))
        .collect();
    // Each shared partition's trust domain, from the same read.
    let domains: HashMap<&str, &str> =
        layers.iter().map(|l| (l.partition.as_str(), l.domain.as_str())).collect();
    let mut entries: HashMap<Key, Vec<Entry>> = HashMap::new();
    // Per moved VM: its stack, image and layout.
    struct Candidate {
        mv: Move,
        image: VmImage,
        keys: Vec<Key>,
        layout: provd_dedup::VmLayout,
    }
    let mut candidates = Vec::new();
    let mut domain: Option<String> = None;
    for (vm, private) in chosen {
        let skip = |why: &str| (vm.clone(), why.to_string());
        if pending.contains(&private.id) {
            skipped.push(skip("an earlier move of it is not settled (it is at the next start)"));
            continue;
        }
        if private.format != PartitionFormat::Ext4 {
            skipped.push(skip(
                "its private partition is qcow2; only raw ext4 boot files are rewritten in place",
            ));
            continue;
        }
        let manifest: PrivateManifest = serde_json::from_str(&private.manifest).map_err(|e| {
            PartitionError::Unreadable { partition: private.id.clone(), reason: e.to_string() }
        })?;
        let from = store.stack_of(&private.id)?;
        if from.is_empty() {
            skipped.push(skip("it stacks no layer"));
            continue;
        }
        let keys: Vec<Key> = from.iter().map(|s| (s.shared.clone(), s.layer.clone())).collect();
        if let Some((p, l)) = keys.iter().find(|k| !recorded.contains(*k)) {
            skipped.push((
                vm.clone(),
                format!("layer {l} of {p} was built before layers' entries were recorded"),
            ));
            continue;
        }
        let Some(image) = store.image(&manifest.image)? else {
            skipped.push(skip("its image is no longer in the store"));
            continue;
        };
        if image.digest != manifest.image_digest {
            skipped.push(skip("its image changed since its partition was built"));
            continue;
        }
        // The domain of what the stack holds: public, or its tenant's when
        // any of its layers is.
        let mut stack_domain = provd_domain::trust::PUBLIC.to_string();
        for (shared, _) in &keys {
            let d = domains.get(shared.as_str()).copied().unwrap_or_default();
            if d != provd_domain::trust::PUBLIC {
                stack_domain = d.to_string();
            }
        }
        match &domain {
            None => domain = Some(stack_domain),
            Some(d) if *d != stack_domain => {
                skipped.push((
                    vm.clone(),
                    format!(
                        "its layers are of domain {stack_domain}, not {d}: a repack never mixes \
                         trust domains; repack it on its own"
                    ),
                ));
                continue;
            }
            Some(_) => {}
        }
        for k in &keys {
            if !entries.contains_key(k) {
                entries.insert(k.clone(), store.layer_entries(&k.0, &k.1)?);
            }
        }
        let image_map: BTreeMap<String, Entry> =
            store.entries(&image, 0, u64::MAX)?.into_iter().map(|e| (e.path.clone(), e)).collect();
        let lowers: Vec<&[Entry]> =
            keys.iter().filter_map(|k| entries.get(k)).map(Vec::as_slice).collect();
        let layout = vm_layout(&lowers, &image_map);
        if layout.whiteouts.len() as u64 != manifest.whiteouts {
            skipped.push(skip("its private partition does not hold the whiteouts its stack needs"));
            continue;
        }
        candidates.push(Candidate {
            mv: Move { vm: vm.clone(), private, manifest, from },
            image: VmImage { vm, image },
            keys,
            layout,
        });
    }

    // Which entries of each layer some VM sees.
    let mut used: HashMap<Key, BTreeSet<usize>> = HashMap::new();
    for c in &candidates {
        for (k, idx) in c.keys.iter().zip(&c.layout.used) {
            used.entry(k.clone()).or_default().extend(idx.iter().copied());
        }
    }
    let mut order: Vec<Key> = Vec::new();
    for c in &candidates {
        for k in &c.keys {
            if !order.contains(k) {
                order.push(k.clone());
            }
        }
    }
    // Cut layers, keeping whole those whose cut would change a VM's view.
    let mut whole: BTreeSet<Key> = BTreeSet::new();
    let (names, layers) = loop {
        let mut names: HashMap<Key, Option<String>> = HashMap::new();
        let mut layers: Vec<(String, Vec<Entry>)> = Vec::new();
        let mut by_digest: HashMap<String, String> = HashMap::new();
        for k in &order {
            let all = entries.get(k).into_iter().flatten().enumerate();
            let cut: Vec<Entry> = all
                .filter(|(i, _)| whole.contains(k) || used.get(k).is_some_and(|u| u.contains(i)))
                .map(|(_, e)| e.clone())
                .collect();
            if cut.is_empty() {
                names.insert(k.clone(), None);
                continue;
            }
            let digest = layer_digest(&cut);
            let name = match by_digest.get(&digest) {
                Some(n) => n.clone(),
                None => {
                    let n = format!("layer-{}", layers.len());
                    by_digest.insert(digest, n.clone());
                    layers.push((n.clone(), cut));
                    n
                }
            };
            names.insert(k.clone(), Some(name));
        }
        let mut changed = false;
        for c in &candidates {
            let old: Vec<&[Entry]> =
                c.keys.iter().filter_map(|k| entries.get(k)).map(Vec::as_slice).collect();
            let stack = new_stack(&c.keys, &names);
            let new: Vec<&[Entry]> = stack
                .iter()
                .filter_map(|n| layers.iter().find(|(m, _)| m == n))
                .map(|(_, e)| e.as_slice())
                .collect();
            let before = overlay_view(&old, &c.layout.private, &c.layout.whiteouts).entries();
            let after = overlay_view(&new, &c.layout.private, &c.layout.whiteouts).entries();
            if without_mtime(before) != without_mtime(after) {
                for k in &c.keys {
                    changed |= whole.insert(k.clone());
                }
            }
        }
        if !changed {
            break (names, layers);
        }
    };

    let mut plan = Plan {
        policy: Policy::default(),
        layers: Vec::new(),
        stacks: BTreeMap::new(),
        private: BTreeMap::new(),
        private_bytes: BTreeMap::new(),
        layer_bytes: 0,
        stored_bytes: 0,
        naive_bytes: 0,
        whiteouts: BTreeMap::new(),
        shares: BTreeMap::new(),
    };
    for c in &candidates {
        let stack = new_stack(&c.keys, &names);
        plan.stacks.insert(c.mv.vm.clone(), stack);
        plan.private.insert(c.mv.vm.clone(), c.layout.private.clone());
        plan.private_bytes.insert(c.mv.vm.clone(), c.layout.private_bytes);
        if !c.layout.whiteouts.is_empty() {
            plan.whiteouts.insert(c.mv.vm.clone(), c.layout.whiteouts.clone());
        }
        plan.naive_bytes += c.layout.image_bytes;
    }
    for (name, cut) in layers {
        let users: Vec<String> = plan
            .stacks
            .iter()
            .filter(|(_, s)| s.contains(&name))
            .map(|(vm, _)| vm.clone())
            .collect();
        let bytes: u64 = cut
            .iter()
            .filter(|e| e.kind == provd_domain::image::EntryKind::File)
            .map(|e| e.size)
            .sum();
        plan.layer_bytes += bytes;
        plan.layers.push(PlannedLayer {
            id: name,
            vms: users,
            files: cut.len() as u64,
            bytes,
            entries: cut,
            node: None,
        });
    }
    plan.stored_bytes = plan.layer_bytes + plan.private_bytes.values().sum::<u64>();
    let (moves, vms) = candidates.into_iter().map(|c| (c.mv, c.image)).unzip();
    Ok(RepackPlan {
        plan,
        vms,
        moves,
        skipped,
        kept_whole: whole.into_iter().collect(),
        domain: domain.unwrap_or_else(|| provd_domain::trust::LEGACY_DOMAIN.to_string()),
    })
}

/// A VM's new stack: its layers' new names in order, a layer cut to
/// nothing dropped, and of a layer named twice only the topmost kept (the
/// same entries, so the view is the same).
fn new_stack(keys: &[Key], names: &HashMap<Key, Option<String>>) -> Vec<String> {
    let mapped: Vec<String> = keys.iter().filter_map(|k| names.get(k).cloned().flatten()).collect();
    let mut out: Vec<String> = Vec::new();
    for (i, n) in mapped.iter().enumerate() {
        if !mapped.iter().skip(i + 1).any(|m| m == n) {
            out.push(n.clone());
        }
    }
    out
}

/// The manifest and stack rows of a moved VM on `shared`, the repack's
/// new shared partition.
pub fn moved_manifest(
    mv: &Move,
    plan: &Plan,
    shared: &PartitionRecord,
) -> Result<(PrivateManifest, Vec<StackedLayer>), PartitionError> {
    let sm = crate::shared_manifest(shared)?;
    let mut manifest = mv.manifest.clone();
    manifest.shared =
        vec![SharedRef { partition: shared.id.clone(), format: sm.format, uuid: sm.uuid }];
    let mut items = Vec::new();
    let mut rows = Vec::new();
    for id in plan.stacks.get(&mv.vm).into_iter().flatten() {
        let layer =
            plan.layers.iter().find(|l| &l.id == id).ok_or_else(|| {
                PartitionError::InvalidPlan(format!("no layer {id} in the repack"))
            })?;
        items.push(StackItem {
            shared: 0,
            layer: id.clone(),
            digest: layer_digest(&layer.entries),
        });
        rows.push(StackedLayer { shared: shared.id.clone(), layer: id.clone() });
    }
    // A VM that sees nothing of its layers any more attaches no shared
    // partition: nothing would keep one alive for it.
    if items.is_empty() {
        manifest.shared.clear();
    }
    manifest.stack = items;
    Ok((manifest, rows))
}

/// Replaces the boot files of a private partition (`provd/partition.json`,
/// `provd/stack`, `provd/shared`) with those of `manifest`, on a sparse
/// copy read back before it is renamed over the original. Nothing under
/// `upper/` changes. Returns the bytes the partition now takes.
pub fn rewrite_boot_files(
    store: &Store,
    private: &PartitionRecord,
    manifest: &PrivateManifest,
    opts: &BuildOptions,
) -> Result<u64, PartitionError> {
    if private.format != PartitionFormat::Ext4 {
        return Err(PartitionError::InvalidPlan(format!(
            "partition {} is {}; boot files are rewritten in raw ext4 only",
            private.id, private.format
        )));
    }
    let tools = opts.tools();
    tools.find(DEBUGFS)?;
    let json = serde_json::to_string_pretty(manifest)
        .map_err(|e| PartitionError::InvalidPlan(format!("encoding the manifest: {e}")))?;
    let files = [
        ("provd/partition.json", json),
        ("provd/stack", crate::stack_file(manifest)),
        ("provd/shared", crate::shared_file(manifest)),
    ];
    let image = store.partition_path(&private.id)?.join(&private.file);
    let (temp, temp_path) = store.create_temp_dir()?;
    let result = (|| {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| PartitionError::Io { what, source }
        };
        let copy = temp_path.join("image");
        sparse_copy(&image, &copy).map_err(io("copying the image"))?;
        let mut script = String::new();
        for (i, (path, text)) in files.iter().enumerate() {
            let source = temp_path.join(format!("file-{i}"));
            std::fs::write(&source, text).map_err(io("writing a boot file"))?;
            script.push_str(&format!(
                "rm {path}\nwrite {} {path}\nsif {path} mode 0100444\nsif {path} uid 0\nsif {path} gid 0\n",
                source.display()
            ));
        }
        let script_path = temp_path.join("script");
        std::fs::write(&script_path, script).map_err(io("writing the debugfs script"))?;
        let mut arg = std::ffi::OsString::from("-f");
        arg.push(&script_path);
        tools.run(DEBUGFS, [std::ffi::OsStr::new("-w"), arg.as_os_str(), copy.as_os_str()])?;
        // debugfs reports failed commands on stderr and exits 0: read every
        // file back before trusting the copy.
        let (fs, found) = read_ext4(&copy, &private.id)?;
        for (path, text) in &files {
            let e = found.iter().find(|e| e.path == *path).ok_or_else(|| {
                PartitionError::InvalidPlan(format!("{path} was not written into {}", private.id))
            })?;
            let mut got = Vec::new();
            fs.read_file(e.ino, &mut got).map_err(|err| PartitionError::Unreadable {
                partition: private.id.clone(),
                reason: err.to_string(),
            })?;
            if got != text.as_bytes() || e.mode != 0o444 || e.uid != 0 || e.gid != 0 {
                return Err(PartitionError::InvalidPlan(format!(
                    "{path} read back from {} differs from what was written",
                    private.id
                )));
            }
        }
        std::fs::File::open(&copy).and_then(|f| f.sync_all()).map_err(io("syncing the copy"))?;
        std::fs::rename(&copy, &image).map_err(io("replacing the image"))?;
        Ok(())
    })();
    store.remove_temp(&temp);
    result?;
    // Replaced: nothing after this may fail the move (its caller would
    // take the partition for untouched). The rename is made durable before
    // the old partitions can be deleted; the size is a figure only.
    if let Some(dir) = image.parent()
        && let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all())
    {
        tracing::warn!(partition = %private.id, error = %e, "syncing a rewritten partition's directory");
    }
    Ok(allocated_bytes(store, private))
}

/// Bytes a partition's image takes on the node's disk now (its record's
/// figure when it cannot be measured).
pub fn allocated_bytes(store: &Store, rec: &PartitionRecord) -> u64 {
    store
        .partition_path(&rec.id)
        .ok()
        .and_then(|dir| crate::allocated(&dir.join(&rec.file)).ok())
        .map_or(rec.bytes, |(bytes, _)| bytes)
}

/// The manifest a private partition carries in `provd/partition.json`.
pub fn carried_manifest(
    store: &Store,
    private: &PartitionRecord,
) -> Result<PrivateManifest, PartitionError> {
    let image = store.partition_path(&private.id)?.join(&private.file);
    let (fs, found) = read_ext4(&image, &private.id)?;
    let e = found.iter().find(|e| e.path == "provd/partition.json").ok_or_else(|| {
        PartitionError::Unreadable {
            partition: private.id.clone(),
            reason: "no provd/partition.json".into(),
        }
    })?;
    let mut text = Vec::new();
    fs.read_file(e.ino, &mut text).map_err(|err| PartitionError::Unreadable {
        partition: private.id.clone(),
        reason: err.to_string(),
    })?;
    serde_json::from_slice(&text).map_err(|err| PartitionError::Unreadable {
        partition: private.id.clone(),
        reason: format!("provd/partition.json: {err}"),
    })
}
