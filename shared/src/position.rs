//! A position in the log: one offset per partition, meaning "every entry of partition p up to
//! offset p is included". The log's heads, a client's cursor (with the database's epoch), the
//! hub's progress and the bounds of a replay are all positions.

use std::ops::{Deref, DerefMut};

use serde::{Deserialize, Serialize};

/// One offset per partition (index = partition). Serialized as a JSON array of offsets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Position(Vec<u64>);

impl Position {
    /// The position before anything, for `partitions` partitions.
    pub fn zero(partitions: usize) -> Position {
        Position(vec![0; partitions])
    }

    /// Number of partitions.
    pub fn partitions(&self) -> usize {
        self.0.len()
    }

    /// Partition by partition, the further of `self` and `other` (of the same length).
    pub fn max(&self, other: &Position) -> Position {
        Position(self.0.iter().zip(&other.0).map(|(a, b)| *a.max(b)).collect())
    }

    /// Whether `self` is past `other` in any partition (both of the same length).
    pub fn ahead_of(&self, other: &Position) -> bool {
        self.0.len() == other.0.len() && self.0.iter().zip(&other.0).any(|(a, b)| a > b)
    }

    /// The offsets.
    pub fn into_offsets(self) -> Vec<u64> {
        self.0
    }
}

impl From<Vec<u64>> for Position {
    fn from(offsets: Vec<u64>) -> Position {
        Position(offsets)
    }
}

impl From<&[u64]> for Position {
    fn from(offsets: &[u64]) -> Position {
        Position(offsets.to_vec())
    }
}

impl<'a> IntoIterator for &'a Position {
    type Item = &'a u64;
    type IntoIter = std::slice::Iter<'a, u64>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Read and set offsets by partition; the number of partitions never changes.
impl Deref for Position {
    type Target = [u64];

    fn deref(&self) -> &[u64] {
        &self.0
    }
}

impl DerefMut for Position {
    fn deref_mut(&mut self) -> &mut [u64] {
        &mut self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_and_ahead() {
        let a = Position::from(vec![1, 5, 3]);
        let b = Position::from(vec![2, 4, 3]);
        assert_eq!(a.max(&b), Position::from(vec![2, 5, 3]));
        assert!(a.ahead_of(&b), "partition 1");
        assert!(b.ahead_of(&a), "partition 0");
        assert!(!a.ahead_of(&a));
        assert!(!a.ahead_of(&Position::zero(2)), "different lengths never compare");
    }

    #[test]
    fn serializes_as_an_array() {
        let p = Position::from(vec![0, 7]);
        assert_eq!(serde_json::to_string(&p).unwrap(), "[0,7]");
        assert_eq!(serde_json::from_str::<Position>("[0,7]").unwrap(), p);
    }
}
