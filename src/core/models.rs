//! Model names and patterns: an exact name, a prefix (`gpt-4o*`) or anything (`*`), and a set of
//! them compiled for lookup. Pure.

use std::collections::HashSet;

/// One entry of a model list: an exact name, a prefix (`gpt-4o*`) or anything (`*`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ModelPattern {
    /// Matches every model.
    Any,
    /// Matches names starting with this prefix.
    Prefix(Box<str>),
    /// Matches this name only.
    Exact(Box<str>),
}

impl ModelPattern {
    /// Parse `name`, `prefix*` or `*`. A `*` anywhere but at the end is an error.
    pub fn parse(s: &str) -> Result<ModelPattern, String> {
        if s.is_empty() {
            return Err("empty model name".into());
        }
        match s.find('*') {
            None => Ok(ModelPattern::Exact(s.into())),
            Some(i) if i == s.len() - 1 => {
                if i == 0 {
                    Ok(ModelPattern::Any)
                } else {
                    Ok(ModelPattern::Prefix(s[..i].into()))
                }
            }
            Some(_) => Err(format!(
                "{s:?}: '*' is only allowed at the end of a model name"
            )),
        }
    }

    /// Whether `model` matches.
    pub fn matches(&self, model: &str) -> bool {
        match self {
            ModelPattern::Any => true,
            ModelPattern::Prefix(p) => model.starts_with(&**p),
            ModelPattern::Exact(e) => &**e == model,
        }
    }
}

/// A set of allowed models, compiled for lookup.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelSet {
    any: bool,
    exact: HashSet<Box<str>>,
    prefixes: Vec<Box<str>>,
}

impl ModelSet {
    /// Compile a list of patterns.
    pub fn compile<S: AsRef<str>>(list: &[S]) -> Result<ModelSet, String> {
        let mut set = ModelSet::default();
        for s in list {
            match ModelPattern::parse(s.as_ref())? {
                ModelPattern::Any => set.any = true,
                ModelPattern::Prefix(p) => set.prefixes.push(p),
                ModelPattern::Exact(e) => {
                    set.exact.insert(e);
                }
            }
        }
        Ok(set)
    }

    /// Whether `model` is allowed.
    pub fn allows(&self, model: &str) -> bool {
        self.any
            || self.exact.contains(model)
            || self.prefixes.iter().any(|p| model.starts_with(&**p))
    }

    /// Whether every model is allowed.
    pub fn allows_all(&self) -> bool {
        self.any
    }

    /// The exact model names in the set.
    pub fn exact_names(&self) -> impl Iterator<Item = &str> {
        self.exact.iter().map(|s| &**s)
    }

    /// The exact names and prefixes (with their `*`), sorted, for listings.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.exact.iter().map(|s| s.to_string()).collect();
        v.extend(self.prefixes.iter().map(|p| format!("{p}*")));
        if self.any {
            v.push("*".into());
        }
        v.sort();
        v
    }
}
