//! A map that a commit can copy in time proportional to what changed since the last full
//! commit, not to the whole index.
//!
//! Each commit starts its next state from a copy of the current one. A plain map of a million
//! document ids would make every 10-row streaming commit copy a million entries; a
//! [`LayeredMap`] is a shared, frozen base (rebuilt by each full commit) under a small layer of
//! the changes since, and copying it copies only that layer.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

/// A frozen base map and the changes made over it (`None`: removed).
#[derive(Debug)]
pub(crate) struct LayeredMap<K, V> {
    base: Arc<HashMap<K, V>>,
    changes: HashMap<K, Option<V>>,
    len: usize,
}

impl<K: Clone, V: Clone> Clone for LayeredMap<K, V> {
    fn clone(&self) -> Self {
        LayeredMap {
            base: self.base.clone(),
            changes: self.changes.clone(),
            len: self.len,
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Default for LayeredMap<K, V> {
    fn default() -> Self {
        Self::from(HashMap::new())
    }
}

impl<K: Hash + Eq + Clone, V: Clone> From<HashMap<K, V>> for LayeredMap<K, V> {
    /// A map whose base is `base`, with no changes over it.
    fn from(base: HashMap<K, V>) -> Self {
        LayeredMap {
            len: base.len(),
            base: Arc::new(base),
            changes: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> LayeredMap<K, V> {
    /// The value of `key`.
    pub(crate) fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self.changes.get(key) {
            Some(changed) => changed.as_ref(),
            None => self.base.get(key),
        }
    }

    /// Whether `key` has a value.
    pub(crate) fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get(key).is_some()
    }

    /// Sets the value of `key`; returns the previous one.
    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        let previous = self.get(&key).cloned();
        if previous.is_none() {
            self.len += 1;
        }
        self.changes.insert(key, Some(value));
        previous
    }

    /// Removes the value of `key`; returns it.
    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        let previous = self.get(key).cloned()?;
        self.len -= 1;
        if self.base.contains_key(key) {
            self.changes.insert(key.clone(), None);
        } else {
            self.changes.remove(key);
        }
        Some(previous)
    }

    /// Every key with its value, as one plain map (a full commit makes it the next base).
    pub(crate) fn flattened(&self) -> HashMap<K, V> {
        let mut map = (*self.base).clone();
        for (key, change) in &self.changes {
            match change {
                Some(value) => map.insert(key.clone(), value.clone()),
                None => map.remove(key),
            };
        }
        map
    }

    /// Keys with a value.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_layer_over_a_shared_base() {
        let base: HashMap<u64, &str> = [(1, "a"), (2, "b")].into();
        let mut map = LayeredMap::from(base);
        let before = map.clone();
        assert_eq!(map.insert(3, "c"), None);
        assert_eq!(map.insert(1, "A"), Some("a"));
        assert_eq!(map.remove(&2), Some("b"));
        assert_eq!(map.remove(&2), None);
        assert_eq!(map.remove(&3), Some("c"));
        assert_eq!(map.insert(2, "B"), None);
        assert_eq!((map.get(&1), map.get(&2), map.get(&3)), (Some(&"A"), Some(&"B"), None));
        assert_eq!(map.len(), 2);
        assert_eq!(map.flattened(), HashMap::from([(1, "A"), (2, "B")]));
        // The copy taken before is untouched.
        assert_eq!(
            (before.get(&1), before.get(&2), before.len()),
            (Some(&"a"), Some(&"b"), 2)
        );
        assert!(Arc::ptr_eq(&map.base, &before.base), "the base is shared, not copied");
    }
}
