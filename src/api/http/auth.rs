//! Bearer tokens: configured as SHA-256 hashes with scopes; compared in constant time.

use crate::api::error::ApiError;
use crate::config::TokenConfig;
use sha2::{Digest, Sha256};
use std::sync::{Arc, PoisonError, RwLock};
use subtle::ConstantTimeEq;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every GET.
    Read,
    /// Allocation operations, set_status, contact and tenancy upserts.
    AllocationsWrite,
    /// Unit create/update, unit type upserts.
    UnitsWrite,
    /// Everything, including the snapshot.
    Admin,
}

impl Scope {
    /// The scope's config name.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::AllocationsWrite => "allocations:write",
            Scope::UnitsWrite => "units:write",
            Scope::Admin => "admin",
        }
    }
}

/// A scope a route requires, as a type, so the check runs as an extractor (before the
/// body is read).
pub trait RequiredScope: Send + Sync + 'static {
    /// The scope.
    const SCOPE: Scope;
}

/// Marker types for [`RequiredScope`].
pub mod needs {
    use super::{RequiredScope, Scope};

    /// `read`.
    pub struct Read;
    /// `allocations:write`.
    pub struct AllocationsWrite;
    /// `units:write`.
    pub struct UnitsWrite;
    /// `admin`.
    pub struct Admin;

    impl RequiredScope for Read {
        const SCOPE: Scope = Scope::Read;
    }
    impl RequiredScope for AllocationsWrite {
        const SCOPE: Scope = Scope::AllocationsWrite;
    }
    impl RequiredScope for UnitsWrite {
        const SCOPE: Scope = Scope::UnitsWrite;
    }
    impl RequiredScope for Admin {
        const SCOPE: Scope = Scope::Admin;
    }
}

/// An authenticated caller holding scope `S`.
pub struct Authorized<S>(pub Principal, std::marker::PhantomData<S>);

impl<S> Authorized<S> {
    /// Wraps a principal already checked for `S`.
    pub fn new(p: Principal) -> Self {
        Authorized(p, std::marker::PhantomData)
    }
}

/// A configured token.
#[derive(Clone)]
struct Token {
    name: String,
    hash: [u8; 32],
    scopes: Vec<Scope>,
}

/// The configured tokens. Clones share one set, so [`Tokens::replace`] (a SIGHUP reload)
/// takes effect for every request that starts afterwards.
#[derive(Clone, Default)]
pub struct Tokens(Arc<RwLock<Arc<Vec<Token>>>>);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.current().iter().map(|t| &t.name))
            .finish()
    }
}

/// Who is calling, once authenticated.
#[derive(Debug, Clone)]
pub struct Principal {
    /// Token name.
    pub name: String,
    scopes: Vec<Scope>,
}

impl Principal {
    /// 403 unless the token has `scope` (or `admin`).
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.scopes.contains(&Scope::Admin) || self.scopes.contains(&scope) {
            Ok(())
        } else {
            Err(ApiError::new(
                403,
                "forbidden",
                format!("this token lacks the {:?} scope", scope.as_str()),
            ))
        }
    }
}

/// A caller inside the gateway, such as a request the MQTT link dispatches to the router,
/// carried as a request extension. Extensions never come from the wire, and only this crate
/// can build one, so no HTTP client can claim it.
#[derive(Debug, Clone)]
pub struct InternalCaller(Principal);

impl InternalCaller {
    /// A caller named `name` (no spaces: it prefixes idempotency keys) holding `scopes`.
    pub(crate) fn new(name: impl Into<String>, scopes: Vec<Scope>) -> Self {
        InternalCaller(Principal {
            name: name.into(),
            scopes,
        })
    }

    /// The principal it stands for.
    pub fn principal(&self) -> &Principal {
        &self.0
    }
}

/// The SHA-256 of a token, hex, as it goes into the config.
pub fn token_hash_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl Tokens {
    /// Builds from config (validated: hex and scopes are known).
    pub fn from_config(tokens: &[TokenConfig]) -> Self {
        Tokens(Arc::new(RwLock::new(Arc::new(Self::parse(tokens)))))
    }

    /// Swaps in the tokens of a new (validated) config for every clone of this set.
    pub fn replace(&self, tokens: &[TokenConfig]) {
        let new = Arc::new(Self::parse(tokens));
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = new;
    }

    fn current(&self) -> Arc<Vec<Token>> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn parse(tokens: &[TokenConfig]) -> Vec<Token> {
        tokens
            .iter()
            .filter_map(|t| {
                let hash: [u8; 32] = hex::decode(&t.sha256).ok()?.try_into().ok()?;
                let scopes = t
                    .scopes
                    .iter()
                    .filter_map(|s| match s.as_str() {
                        "read" => Some(Scope::Read),
                        "allocations:write" => Some(Scope::AllocationsWrite),
                        "units:write" => Some(Scope::UnitsWrite),
                        "admin" => Some(Scope::Admin),
                        _ => None,
                    })
                    .collect();
                Some(Token {
                    name: t.name.clone(),
                    hash,
                    scopes,
                })
            })
            .collect()
    }

    /// Checks an `Authorization` header value. Every configured hash is compared, in
    /// constant time, so timing says nothing about which (if any) matched.
    pub fn authenticate(&self, header: Option<&str>) -> Result<Principal, ApiError> {
        let unauthorized = |m: &str| ApiError::new(401, "unauthorized", m);
        let header = header.ok_or_else(|| unauthorized("missing Authorization: Bearer <token>"))?;
        let token = match header.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
            _ => {
                return Err(unauthorized(
                    "the Authorization header must be \"Bearer <token>\"",
                ));
            }
        };
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let tokens = self.current();
        let mut found: Option<&Token> = None;
        for t in tokens.iter() {
            if bool::from(t.hash.ct_eq(&presented)) {
                found = Some(t);
            }
        }
        let t = found.ok_or_else(|| unauthorized("invalid token"))?;
        Ok(Principal {
            name: t.name.clone(),
            scopes: t.scopes.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens::from_config(&[TokenConfig {
            name: "reader".into(),
            sha256: token_hash_hex("s3cret"),
            scopes: vec!["read".into()],
        }])
    }

    #[test]
    fn internal_caller_holds_its_scopes() {
        let c = InternalCaller::new("mqtt", vec![Scope::Read]);
        assert_eq!(c.principal().name, "mqtt");
        assert!(c.principal().require(Scope::Read).is_ok());
        assert_eq!(c.principal().require(Scope::Admin).unwrap_err().status, 403);
    }

    #[test]
    fn replace_swaps_the_set_for_every_clone() {
        let set = tokens();
        let held_by_router = set.clone();
        set.replace(&[TokenConfig {
            name: "new".into(),
            sha256: token_hash_hex("fresh"),
            scopes: vec!["admin".into()],
        }]);
        assert_eq!(
            held_by_router
                .authenticate(Some("Bearer fresh"))
                .unwrap()
                .name,
            "new"
        );
        let old = held_by_router.authenticate(Some("Bearer s3cret"));
        assert_eq!(old.unwrap_err().status, 401);
    }

    #[test]
    fn bearer_token_by_hash() {
        let p = tokens().authenticate(Some("Bearer s3cret")).unwrap();
        assert_eq!(p.name, "reader");
        assert!(p.require(Scope::Read).is_ok());
        assert_eq!(p.require(Scope::AllocationsWrite).unwrap_err().status, 403);
        assert_eq!(
            tokens().authenticate(Some("bearer s3cret")).unwrap().name,
            "reader"
        );
        for bad in [
            None,
            Some("Bearer nope"),
            Some("Basic s3cret"),
            Some("s3cret"),
        ] {
            assert_eq!(
                tokens().authenticate(bad).unwrap_err().status,
                401,
                "{bad:?}"
            );
        }
    }
}
