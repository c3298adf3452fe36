//! Who may call the scheduler: clients with a client token, builders with a builder token or a
//! certificate signed by the builder CA. A refusal says which credential is missing or wrong,
//! and a token of the other role is told apart from an unknown one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kiln_net::auth::Tokens;
use kiln_net::tls::Peer;
use tonic::{Request, Status};

/// The credentials the scheduler accepts. With nothing configured a role is open: that is only
/// reachable through `--insecure` in `kiln-scheduler`.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    /// The tokens clients present.
    pub client_tokens: Option<Arc<Tokens>>,
    /// The tokens builders present.
    pub builder_tokens: Option<Arc<Tokens>>,
    /// A verified client certificate (the listener's client CA signed it) makes a builder.
    pub builder_certs: bool,
    /// The hash of the token an in-process builder presents (`--local-builder`).
    pub local_builder: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Builder,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name, `certificate` for a builder's certificate, or `anyone` on an open farm.
    pub name: String,
    /// Jobs this caller may have in flight.
    pub max_jobs: Option<u32>,
}

impl Auth {
    fn open(&self, role: Role) -> bool {
        match role {
            Role::Client => self.client_tokens.is_none(),
            Role::Builder => {
                self.builder_tokens.is_none() && !self.builder_certs && self.local_builder.is_none()
            }
        }
    }

    fn tokens(&self, role: Role) -> Option<&Tokens> {
        match role {
            Role::Client => self.client_tokens.as_deref(),
            Role::Builder => self.builder_tokens.as_deref(),
        }
    }

    /// Checks `request`'s credentials for `role`. `needs` names the call for a refusal, with
    /// its verb: `jobs need`, `status calls need`.
    pub fn check<T>(
        &self,
        request: &Request<T>,
        role: Role,
        needs: &str,
    ) -> Result<Caller, Status> {
        // A verified client certificate is a builder's: the listener's client CA is the
        // --builder-ca, and clients present tokens only.
        let certified = self.builder_certs
            && request
                .extensions()
                .get::<Peer>()
                .is_some_and(|p| p.certs.as_ref().is_some_and(|c| !c.is_empty()));
        if role == Role::Builder && certified {
            return Ok(Caller {
                name: "certificate".into(),
                max_jobs: None,
            });
        }
        let token = request
            .metadata()
            .get(kiln_net::auth::HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(kiln_net::auth::presented);
        let Some(token) = token else {
            if self.open(role) {
                return Ok(Caller {
                    name: "anyone".into(),
                    max_jobs: None,
                });
            }
            if certified {
                return Err(Status::permission_denied(format!(
                    "the caller presented a builder's certificate and no token: {needs} a \
                     client token"
                )));
            }
            return Err(Status::unauthenticated(match role {
                Role::Client => {
                    "no client token: set KILN_TOKEN_FILE (or token_file in kiln's config) to a \
                     file holding a token listed in the scheduler's --client-tokens"
                }
                Role::Builder => {
                    "no builder token or certificate: start kiln-builder with --token-file \
                     naming a token in the scheduler's --builder-tokens, or with --tls-cert and \
                     --tls-key signed by its --builder-ca"
                }
            }));
        };
        if role == Role::Builder
            && self
                .local_builder
                .as_ref()
                .is_some_and(|h| *h == kiln_net::auth::hash(&token))
        {
            return Ok(Caller {
                name: "local builder".into(),
                max_jobs: None,
            });
        }
        if let Some(grant) = self.tokens(role).and_then(|t| t.check(&token)) {
            return Ok(Caller {
                name: grant.name,
                max_jobs: grant.max_jobs,
            });
        }
        if self.open(role) {
            return Ok(Caller {
                name: "anyone".into(),
                max_jobs: None,
            });
        }
        let other = match role {
            Role::Client => Role::Builder,
            Role::Builder => Role::Client,
        };
        if let Some(grant) = self.tokens(other).and_then(|t| t.check(&token)) {
            return Err(Status::permission_denied(match role {
                Role::Client => format!(
                    "the token presented is builder token {:?}: {needs} a client token",
                    grant.name
                ),
                Role::Builder => format!(
                    "the token presented is client token {:?}: {needs} a builder token",
                    grant.name
                ),
            }));
        }
        Err(Status::unauthenticated(match role {
            Role::Client => "the client token is not in the scheduler's --client-tokens (revoked, or the wrong file?)",
            Role::Builder => "the builder token is not in the scheduler's --builder-tokens (revoked, or the wrong file?)",
        }))
    }
}

/// Jobs in flight per caller, for the callers whose token limits them.
#[derive(Debug, Default, Clone)]
pub struct InFlight(Arc<Mutex<HashMap<String, u32>>>);

/// One job counted against its caller; dropping it ends the count.
#[derive(Debug)]
pub struct Held {
    counts: InFlight,
    name: String,
}

impl InFlight {
    /// Counts a job for `caller`, unless it already has as many as its token allows.
    pub fn take(&self, caller: &Caller) -> Result<Option<Held>, Status> {
        let Some(max) = caller.max_jobs else {
            return Ok(None);
        };
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(caller.name.clone()).or_default();
        if *n >= max {
            return Err(Status::resource_exhausted(format!(
                "client token {:?} allows {max} jobs in flight and has them all",
                caller.name
            )));
        }
        *n += 1;
        Ok(Some(Held {
            counts: self.clone(),
            name: caller.name.clone(),
        }))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.name) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.name);
            }
        }
    }
}
