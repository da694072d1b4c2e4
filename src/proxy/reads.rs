//! The read routes: listings of what the caller may use, who the caller is, the caller's usage.

use super::routes::{Read, Scope};
use super::{errors, Gateway};
use crate::admin::listings;
use crate::auth::Identity;
use crate::catalog::{Deployment, LookupError};
use crate::openai::ApiError;
use bytes::Bytes;

impl Gateway {
    /// Answers a read route for `identity`, showing only what it may use.
    pub(super) fn read(
        &self,
        read: &Read,
        query: Option<&str>,
        identity: &Identity,
    ) -> Result<Bytes, ApiError> {
        let catalog = self.catalog.load_full();
        let visible = |d: &Deployment| d.visible_to(identity);
        let cluster_not_found = |cluster: &String| {
            errors::lookup(LookupError::ClusterNotFound {
                cluster: cluster.clone(),
            })
        };
        Ok(match read {
            Read::Models { scope } => {
                self.check_scope(scope.as_ref())?;
                let in_scope = |d: &Deployment| in_scope(scope.as_ref(), d) && visible(d);
                listings::models(&catalog, self.started_unix, in_scope)
            }
            Read::Model { scope, id } => {
                self.check_scope(scope.as_ref())?;
                let in_scope = |d: &Deployment| in_scope(scope.as_ref(), d) && visible(d);
                listings::model(&catalog, self.started_unix, id, in_scope).ok_or_else(|| {
                    errors::lookup(LookupError::ModelNotFound {
                        cluster: scope.as_ref().map(|s| s.cluster.clone()),
                        model: id.clone(),
                    })
                })?
            }
            Read::ListEndpoints => listings::list_endpoints(&catalog, visible),
            Read::Health => Bytes::from_static(br#"{"status":"ok"}"#),
            Read::Whoami => Bytes::from(identity.whoami().to_string()),
            Read::Usage => listings::usage(
                &identity.username,
                &self.accounting.totals.of(&identity.username),
            ),
            Read::Jobs { cluster } => listings::jobs(&catalog, cluster, visible)
                .ok_or_else(|| cluster_not_found(cluster))?,
            Read::ClusterModels { cluster } => {
                let model_id = query.and_then(|q| {
                    q.split('&')
                        .find_map(|kv| kv.strip_prefix("model_id="))
                        .filter(|v| !v.is_empty())
                });
                listings::cluster_models(&catalog, cluster, model_id, visible).ok_or_else(|| {
                    match model_id {
                        Some(m) if catalog.cluster(cluster).is_some() => {
                            errors::lookup(LookupError::ModelNotFound {
                                cluster: Some(cluster.clone()),
                                model: m.to_string(),
                            })
                        }
                        _ => cluster_not_found(cluster),
                    }
                })?
            }
        })
    }

    /// A FIRST-layout base must name a cluster and framework that exist.
    fn check_scope(&self, scope: Option<&Scope>) -> Result<(), ApiError> {
        let Some(scope) = scope else { return Ok(()) };
        let catalog = self.catalog.load_full();
        let cluster = catalog.cluster(&scope.cluster).ok_or_else(|| {
            errors::lookup(LookupError::ClusterNotFound {
                cluster: scope.cluster.clone(),
            })
        })?;
        if cluster.frameworks.contains_key(&scope.framework) {
            Ok(())
        } else {
            Err(errors::framework_not_listed(
                &scope.cluster,
                &scope.framework,
            ))
        }
    }
}

/// Whether a deployment belongs to the base's cluster and framework (any, without one).
fn in_scope(scope: Option<&Scope>, d: &Deployment) -> bool {
    scope.is_none_or(|s| d.cluster == s.cluster && d.framework == s.framework)
}
