//! Plans made against the layers a node already holds.
//!
//! VMs arrive one request at a time. A layer built for an earlier request
//! is immutable and known by its digest; a new VM stacks it when it holds
//! enough of the VM's files exactly as the VM's image has them (same path,
//! type, mode, owner, content, link target and device). What such a layer
//! holds that the image lacks is hidden by whiteouts in the VM's private
//! set, and what it holds differently is overridden there, so the VM sees
//! exactly its image (proved by [`crate::Plan::reassemble`]). Only the
//! files no chosen layer gives go on: into layers of this plan (files the
//! new VMs share, or with [`Policy::layer_unique_files`] a VM's own) or into
//! the VM's private set.
//!
//! Layers are chosen per VM, greedily, by the bytes of its files they give
//! that no layer chosen before gives; a layer giving fewer than
//! `min_layer_bytes` is not worth an overlay layer. The chosen layers are
//! then stacked so that a layer holding a path otherwise than the image
//! lies below the layers holding it as the image does; whatever still ends
//! up hidden is overridden by the private set. One layer and one shared
//! partition are always left for the plan's own layers, within
//! `max_layers_per_vm` and `max_shared_partitions`.

use std::collections::{BTreeMap, HashMap, HashSet};

use provd_domain::image::{Entry, EntryKind};

use crate::{
    DedupError, FileKey, MAX_VMS, NodeRef, Plan, PlannedLayer, Policy, analyze, file_bytes, overlay,
};

/// A layer on one of the node's shared partitions, with its entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLayer {
    pub node: NodeRef,
    /// Its entries, as recorded when it was built.
    pub entries: Vec<Entry>,
}

/// What a node layer gives one VM.
struct Candidate<'a> {
    layer: usize,
    /// Paths it gives exactly as the image has them, with their bytes.
    gives: Vec<(&'a str, u64)>,
    /// Paths where it holds something else than the image.
    differs: HashSet<&'a str>,
}

fn check_input(vms: &[(String, Vec<Entry>)]) -> Result<(), DedupError> {
    if vms.len() > MAX_VMS {
        return Err(DedupError::TooManyVms(vms.len()));
    }
    let mut names = HashSet::new();
    for (name, entries) in vms {
        if !names.insert(name) {
            return Err(DedupError::DuplicateVm(name.clone()));
        }
        let mut paths = HashSet::new();
        for e in entries {
            if !paths.insert(&e.path) {
                return Err(DedupError::DuplicatePath { vm: name.clone(), path: e.path.clone() });
            }
        }
    }
    Ok(())
}

/// The node layers' entries by path: (layer, entry) for each layer
/// holding the path. Built once per plan, so that matching a VM costs its
/// own entries, however many VMs and layers there are.
type NodeIndex<'a> = HashMap<&'a str, Vec<(usize, &'a Entry)>>;

fn node_index(node: &[NodeLayer]) -> NodeIndex<'_> {
    let mut index: NodeIndex = HashMap::new();
    for (i, layer) in node.iter().enumerate() {
        for e in &layer.entries {
            index.entry(e.path.as_str()).or_default().push((i, e));
        }
    }
    index
}

/// Node layers for one VM whose image is `entries`, bottom first.
fn choose<'a>(
    entries: &'a [Entry],
    index: &NodeIndex<'_>,
    node: &[NodeLayer],
    policy: &Policy,
) -> Vec<usize> {
    let mut by_layer: HashMap<usize, Candidate<'a>> = HashMap::new();
    for own in entries {
        for (i, e) in index.get(own.path.as_str()).into_iter().flatten() {
            let c = by_layer.entry(*i).or_insert_with(|| Candidate {
                layer: *i,
                gives: Vec::new(),
                differs: HashSet::new(),
            });
            if FileKey::of(own) == FileKey::of(e) {
                c.gives.push((own.path.as_str(), file_bytes(own)));
            } else {
                c.differs.insert(own.path.as_str());
            }
        }
    }
    let mut candidates: Vec<Candidate> =
        by_layer.into_values().filter(|c| !c.gives.is_empty()).collect();
    // Ties go to the layer the node listed first, whatever the hash order.
    candidates.sort_by_key(|c| c.layer);
    let max_layers = policy.max_layers_per_vm.saturating_sub(1);
    let max_partitions = policy.max_shared_partitions.saturating_sub(1);
    let mut chosen: Vec<Candidate> = Vec::new();
    let mut partitions: Vec<&str> = Vec::new();
    // Path → bytes, for the paths chosen layers give.
    let mut given: HashMap<&str, u64> = HashMap::new();
    while chosen.len() < max_layers {
        let mut best: Option<(usize, u64)> = None;
        for (k, c) in candidates.iter().enumerate() {
            let partition = node.get(c.layer).map(|l| l.node.partition.as_str()).unwrap_or("");
            if !partitions.contains(&partition) && partitions.len() >= max_partitions {
                continue;
            }
            // What it holds differently from a chosen layer's correct
            // entry costs nothing when it is stacked below that layer
            // (see `order`).
            let gain: u64 =
                c.gives.iter().filter(|(p, _)| !given.contains_key(p)).map(|g| g.1).sum();
            if best.is_none_or(|(_, b)| gain > b) {
                best = Some((k, gain));
            }
        }
        let Some((k, gain)) = best else { break };
        if gain == 0 || gain < policy.min_layer_bytes {
            break;
        }
        let c = candidates.swap_remove(k);
        for (p, bytes) in &c.gives {
            given.insert(p, *bytes);
        }
        if let Some(layer) = node.get(c.layer)
            && !partitions.contains(&layer.node.partition.as_str())
        {
            partitions.push(&layer.node.partition);
        }
        chosen.push(c);
    }
    order(chosen)
}

/// Whether [`plan_on_node`] could stack `layer` for a VM whose image is
/// `entries`. The greedy choice stacks a layer only when the bytes it
/// gives that no layer chosen before gives reach `min_layer_bytes` (and at
/// least one byte); those never exceed all the bytes it gives as the image
/// has them. A layer added to the node that could not be chosen changes
/// neither the choice nor its order, so a plan made before it was added
/// stays the plan [`plan_on_node`] makes with it.
pub fn could_stack(entries: &[Entry], layer: &[Entry], policy: &Policy) -> bool {
    let by_path: HashMap<&str, &Entry> = layer.iter().map(|e| (e.path.as_str(), e)).collect();
    let gives: u64 = entries
        .iter()
        .filter(|own| {
            by_path.get(own.path.as_str()).is_some_and(|e| FileKey::of(own) == FileKey::of(e))
        })
        .map(file_bytes)
        .sum();
    policy.max_layers_per_vm > 1
        && policy.max_shared_partitions > 1
        && gives > 0
        && gives >= policy.min_layer_bytes
}

/// Stacks the chosen layers so that a layer holding a path differently
/// from the image lies below every chosen layer holding it as the image
/// has it; among layers free to go next, the one chosen first goes lower.
/// Where the layers disagree both ways (a cycle), the rest follow in the
/// order chosen, and the plan's private set overrides what ends up hidden.
fn order(chosen: Vec<Candidate>) -> Vec<usize> {
    // Layers not placed yet, in the order chosen.
    let mut left: Vec<Candidate> = chosen;
    let mut out = Vec::with_capacity(left.len());
    while !left.is_empty() {
        // A layer may go next (lowest) when no layer left holds otherwise
        // a path it holds as the image has it: such a layer must lie below.
        let free = left.iter().position(|c| {
            !left.iter().any(|other| c.gives.iter().any(|(p, _)| other.differs.contains(p)))
        });
        let c = left.remove(free.unwrap_or(0));
        out.push(c.layer);
    }
    out
}

/// Plans `vms` (name, entries) on a node holding the layers `node`: each VM
/// stacks the node layers that give it the most, and only the rest is
/// planned as [`crate::Analysis::plan`] would. Node layers are named
/// `node-0`, `node-1`, … in the plan, in the order first chosen; the plan's
/// own layers `layer-0`, `layer-1`, ….
pub fn plan_on_node(
    vms: &[(String, Vec<Entry>)],
    node: &[NodeLayer],
    policy: &Policy,
) -> Result<Plan, DedupError> {
    check_input(vms)?;
    let mut node_ids: BTreeMap<usize, String> = BTreeMap::new();
    let mut node_order: Vec<usize> = Vec::new();
    let mut chosen: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    // Per VM, what is left for this plan's own layers once node layers
    // give their part (`None`: its whole image, not copied).
    let mut residuals: Vec<(String, Option<Vec<Entry>>)> = Vec::with_capacity(vms.len());
    let index = node_index(node);
    for (name, entries) in vms {
        let picked = if policy.max_layers_per_vm == 0 {
            Vec::new()
        } else {
            choose(entries, &index, node, policy)
        };
        if picked.is_empty() {
            chosen.insert(name.clone(), picked);
            residuals.push((name.clone(), None));
            continue;
        }
        let lowers: Vec<&[Entry]> =
            picked.iter().filter_map(|&i| node.get(i)).map(|l| l.entries.as_slice()).collect();
        let view = overlay::overlay_view(&lowers, &[], &[]);
        // The rest: every directory, and every entry the chosen layers do
        // not show exactly as the image has it.
        let rest: Vec<Entry> =
            entries.iter().filter(|e| view.layer_giving(e).is_none()).cloned().collect();
        for &i in &picked {
            if let std::collections::btree_map::Entry::Vacant(slot) = node_ids.entry(i) {
                slot.insert(format!("node-{}", node_order.len()));
                node_order.push(i);
            }
        }
        chosen.insert(name.clone(), picked);
        residuals.push((name.clone(), Some(rest)));
    }

    let analysis = if residuals.iter().all(|(_, r)| r.is_none()) {
        analyze(vms)?
    } else {
        let owned: Vec<(String, Vec<Entry>)> = residuals
            .into_iter()
            .zip(vms)
            .map(|((name, rest), (_, image))| (name, rest.unwrap_or_else(|| image.clone())))
            .collect();
        analyze(&owned)?
    };
    let room: BTreeMap<String, usize> = vms
        .iter()
        .map(|(name, _)| {
            let used = chosen.get(name).map(Vec::len).unwrap_or(0);
            (name.clone(), policy.max_layers_per_vm.saturating_sub(used))
        })
        .collect();
    let mut plan = analysis.plan_with_room(policy, &room);
    // The analysis holds every entry several times over: gone before the
    // private sets are worked out, so the two never weigh at once.
    drop(analysis);

    let mut layers: Vec<PlannedLayer> = Vec::new();
    for &i in &node_order {
        let Some(layer) = node.get(i) else { continue };
        let users: Vec<String> = chosen
            .iter()
            .filter(|(_, picked)| picked.contains(&i))
            .map(|(vm, _)| vm.clone())
            .collect();
        layers.push(PlannedLayer {
            id: node_ids.get(&i).cloned().unwrap_or_default(),
            vms: users,
            files: layer.entries.iter().filter(|e| e.kind != EntryKind::Dir).count() as u64,
            bytes: layer.entries.iter().map(file_bytes).sum(),
            entries: layer.entries.clone(),
            node: Some(layer.node.clone()),
        });
    }
    layers.append(&mut plan.layers);
    plan.layers = layers;
    for (vm, stack) in plan.stacks.iter_mut() {
        let mut full: Vec<String> =
            chosen.get(vm).into_iter().flatten().filter_map(|i| node_ids.get(i).cloned()).collect();
        full.append(stack);
        *stack = full;
    }
    plan.naive_bytes = vms.iter().flat_map(|(_, es)| es).map(file_bytes).sum();
    let images: BTreeMap<String, BTreeMap<String, Entry>> = vms
        .iter()
        .map(|(name, es)| (name.clone(), es.iter().map(|e| (e.path.clone(), e.clone())).collect()))
        .collect();
    overlay::finish(&mut plan, &images);
    Ok(plan)
}
