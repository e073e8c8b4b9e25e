//! A field in a partial update: absent, explicitly `null`, or a value.

use serde::{Deserialize, Deserializer};

/// Distinguishes an omitted field from `null`, which `Option` cannot.
/// Use with `#[serde(default)]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Patch<T> {
    /// The field was not in the request: leave it unchanged.
    #[default]
    Absent,
    /// The field was `null`.
    Null,
    /// The field was given a value.
    Value(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Patch<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Option::<T>::deserialize(d)? {
            None => Patch::Null,
            Some(v) => Patch::Value(v),
        })
    }
}

impl<T> Patch<T> {
    /// The value, if one was given.
    pub fn value(&self) -> Option<&T> {
        match self {
            Patch::Value(v) => Some(v),
            _ => None,
        }
    }

    /// Whether the field was present at all.
    pub fn is_present(&self) -> bool {
        !matches!(self, Patch::Absent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Body {
        #[serde(default)]
        zones: Patch<Vec<String>>,
    }

    #[test]
    fn absent_null_and_value_differ() {
        let b: Body = serde_json::from_str("{}").unwrap();
        assert_eq!(b.zones, Patch::Absent);
        let b: Body = serde_json::from_str(r#"{"zones": null}"#).unwrap();
        assert_eq!(b.zones, Patch::Null);
        let b: Body = serde_json::from_str(r#"{"zones": []}"#).unwrap();
        assert_eq!(b.zones, Patch::Value(vec![]));
    }
}
