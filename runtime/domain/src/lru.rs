//! A bounded map that drops its least recently used entries: what every
//! cache a daemon keeps for its lifetime is built on, so that none grows
//! with the node's history.

use std::collections::HashMap;
use std::hash::Hash;

/// At most `max_entries` entries weighing `max_weight` together; each
/// insert drops the least recently used entries until both hold.
#[derive(Debug)]
pub struct Lru<K, V> {
    entries: HashMap<K, (V, u64, u64)>,
    clock: u64,
    weight: u64,
    max_entries: usize,
    max_weight: u64,
}

impl<K: Eq + Hash + Clone, V> Lru<K, V> {
    pub fn new(max_entries: usize, max_weight: u64) -> Self {
        Lru { entries: HashMap::new(), clock: 0, weight: 0, max_entries, max_weight }
    }

    /// The value under `key`, now the most recently used.
    pub fn get(&mut self, key: &K) -> Option<&mut V> {
        self.clock += 1;
        let now = self.clock;
        let (value, used, _) = self.entries.get_mut(key)?;
        *used = now;
        Some(value)
    }

    /// Keeps `value` under `key`, weighing `weight`, and drops the least
    /// recently used entries past the bounds. A value heavier than all the
    /// weight allowed is not kept.
    pub fn insert(&mut self, key: K, value: V, weight: u64) {
        self.remove(&key);
        if weight > self.max_weight || self.max_entries == 0 {
            return;
        }
        self.clock += 1;
        self.entries.insert(key, (value, self.clock, weight));
        self.weight += weight;
        while self.entries.len() > self.max_entries || self.weight > self.max_weight {
            let Some(oldest) =
                self.entries.iter().min_by_key(|(_, (_, used, _))| *used).map(|(k, _)| k.clone())
            else {
                break;
            };
            self.remove(&oldest);
        }
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        let (value, _, weight) = self.entries.remove(key)?;
        self.weight = self.weight.saturating_sub(weight);
        Some(value)
    }

    /// Entries kept and their weight together.
    pub fn size(&self) -> (usize, u64) {
        (self.entries.len(), self.weight)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_least_recently_used_go_first_within_both_bounds() {
        let mut lru = Lru::new(3, 100);
        for k in 0..3 {
            lru.insert(k, k * 10, 10);
        }
        // 0 used again: 1 is now the oldest and goes when 3 comes.
        assert_eq!(lru.get(&0).copied(), Some(0));
        lru.insert(3, 30, 10);
        assert_eq!(lru.size(), (3, 30));
        assert!(lru.get(&1).is_none());
        assert!(lru.get(&0).is_some() && lru.get(&2).is_some() && lru.get(&3).is_some());
        // A heavy entry pushes out as many as its weight needs.
        // 0, 2, 3 weigh 30: 0 and 2, the oldest, go.
        lru.insert(4, 40, 90);
        assert_eq!(lru.size(), (2, 100));
        assert!(lru.get(&4).is_some() && lru.get(&3).is_some());
        // One heavier than the bound is not kept, and an insert under a
        // key replaces its weight.
        lru.insert(5, 50, 101);
        assert!(lru.get(&5).is_none());
        lru.insert(4, 41, 5);
        assert_eq!(lru.size(), (2, 15));
        assert_eq!(lru.remove(&4), Some(41));
        assert_eq!(lru.size(), (1, 10));
    }
}
