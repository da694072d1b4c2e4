//! The OpenAI Files and Batch APIs on the proxy: reads the request, calls
//! [`crate::batch::Batches`] off the async workers, answers in OpenAI's shapes. Batch lines
//! themselves come back as ordinary inference requests (see `batch_line_owner`).

use super::routes::BatchCall;
use super::serve::Outcome;
use super::{body, errors, respond, Gateway, RequestCtx};
use crate::auth::Identity;
use crate::batch::{BatchError, Batches, FirstRequest, Owner, LINE_BATCH_HEADER, LINE_HEADER};
use crate::openai::ApiError;
use bytes::Bytes;
use pingora::proxy::Session;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

/// Largest body of `POST /v1/batches`.
const CREATE_BODY_MAX: usize = 64 * 1024;

impl Gateway {
    pub(super) async fn batch_api(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        call: BatchCall,
        identity: &Arc<Identity>,
    ) -> Result<Outcome, ApiError> {
        let req = session.req_header();
        let (method, path) = (req.method.clone(), req.uri.path().to_string());
        let Some(batches) = self.batches.clone() else {
            let first = matches!(
                call,
                BatchCall::FirstCreate { .. }
                    | BatchCall::FirstList
                    | BatchCall::FirstStatus(_)
                    | BatchCall::FirstResult(_)
            );
            if first {
                return Err(ApiError::new(
                    400,
                    "batch_unavailable",
                    "Batch is not available on this gateway (its configuration has no `batch:` \
                     section).",
                ));
            }
            return Err(errors::route(
                super::routes::RouteError::NotFound,
                &method,
                &path,
            ));
        };
        if call == BatchCall::Elsewhere {
            return Err(errors::batch_elsewhere(&path));
        }
        if let BatchCall::FirstCreate { cluster, framework } = call {
            return self
                .first_create(session, &batches, &cluster, &framework, identity)
                .await;
        }
        let query: HashMap<String, String> = req
            .uri
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        let user = identity.username.clone();
        let timeout = self.edge.client_read_timeout;
        let answer = match call {
            BatchCall::Upload => {
                let max = batches.settings.max_file_bytes;
                let content_type = header(session, "content-type");
                let body = body::read_whole(session, max, timeout).await?;
                let form = multipart(content_type.as_deref(), body).await?;
                let catalog = self.catalog.load_full();
                let ident = identity.clone();
                let may_use = move |model: &str| {
                    catalog
                        .resolve_federated(model)
                        .is_ok_and(|ds| ds.iter().any(|d| d.visible_to(&ident)))
                };
                blocking(batches, move |b| {
                    b.upload(&user, &form.filename, &form.purpose, &form.file, &may_use)
                })
                .await?
            }
            BatchCall::ListFiles => blocking(batches, move |b| b.files(&user, &query)).await?,
            BatchCall::File(id) => blocking(batches, move |b| b.file(&user, &id)).await?,
            BatchCall::DeleteFile(id) => blocking(batches, move |b| b.delete(&user, &id)).await?,
            BatchCall::Content(id) => {
                let (_, bytes) = blocking(batches, move |b| b.content(&user, &id)).await?;
                respond::send_body(
                    session,
                    ctx,
                    200,
                    "application/octet-stream",
                    bytes.into(),
                    &[],
                )
                .await
                .map_err(|_| errors::body_incomplete())?;
                return Ok(Outcome::Answered);
            }
            BatchCall::Create => {
                let body = body::read_whole(session, CREATE_BODY_MAX, timeout).await?;
                let v: Value = serde_json::from_slice(&body).map_err(|e| {
                    ApiError::invalid_request(format!("The body is not valid JSON: {e}"))
                })?;
                let owner = Owner::of(identity);
                blocking(batches, move |b| b.create(owner, &v)).await?
            }
            BatchCall::ListBatches => blocking(batches, move |b| b.batches(&user, &query)).await?,
            BatchCall::Batch(id) => blocking(batches, move |b| b.batch(&user, &id)).await?,
            BatchCall::Cancel(id) => blocking(batches, move |b| b.cancel(&user, &id)).await?,
            BatchCall::FirstList => {
                let status = query.get("status").cloned();
                blocking(batches, move |b| b.first_list(&user, status.as_deref())).await?
            }
            BatchCall::FirstStatus(id) => {
                blocking(batches, move |b| b.first_status(&user, &id)).await?
            }
            BatchCall::FirstResult(id) => {
                blocking(batches, move |b| b.first_result(&user, &id)).await?
            }
            BatchCall::Elsewhere | BatchCall::FirstCreate { .. } => {
                unreachable!("answered above")
            }
        };
        Ok(Outcome::Answer(Bytes::from(answer.to_string())))
    }

    /// FIRST's `POST /resource_server/{cluster}/{framework}/v1/batches`: the model's batch
    /// function on the cluster's Globus Compute endpoint.
    async fn first_create(
        &self,
        session: &mut Session,
        batches: &Arc<Batches>,
        cluster: &str,
        framework: &str,
        identity: &Arc<Identity>,
    ) -> Result<Outcome, ApiError> {
        let body =
            body::read_whole(session, CREATE_BODY_MAX, self.edge.client_read_timeout).await?;
        let req = FirstRequest::parse(&body).map_err(errors::batch)?;
        let catalog = self.catalog.load_full();
        let d = catalog
            .resolve(cluster, framework, &req.model)
            .map_err(errors::lookup)?
            .clone();
        super::routing::check_access(identity, &d)?;
        let target = d
            .compute
            .as_ref()
            .and_then(|c| Some((c.batch_endpoint.clone()?, c.batch_function.clone()?)));
        let (Some((endpoint, function)), Some(cold)) = (target, self.cold.as_ref()) else {
            return Err(ApiError::new(
                400,
                "batch_unavailable",
                format!(
                    "Batch is not available for '{}' on cluster '{cluster}': the model has no batch \
                     function. GET /resource_server/list-endpoints shows what each cluster offers.",
                    d.model
                ),
            ));
        };
        // FIRST checks the batch endpoint first: a batch sent to an offline endpoint would sit
        // pending for days.
        match cold.client.endpoint_status(&endpoint).await {
            Ok(s) if s.online => {}
            Ok(_) => {
                return Err(ApiError::new(
                    503,
                    "endpoint_offline",
                    format!(
                        "The batch endpoint of '{}' on cluster '{cluster}' is offline. Try again \
                         later.",
                        d.model
                    ),
                )
                .with_retry_after(60))
            }
            Err(e) => return Err(errors::compute(&e, &d)),
        }
        let owner = Owner::of(identity);
        let (cl, fw, model) = (cluster.to_string(), framework.to_string(), d.model.clone());
        let row = blocking(batches.clone(), move |b| {
            b.first_admit(&owner, &cl, &fw, &model, &req)
        })
        .await?;
        let mut params =
            serde_json::json!({"input_file": row.input_file, "model": d.backend_model});
        if let Some(out) = &row.output_folder_path {
            params["output_folder_path"] = out.as_str().into();
        }
        let arg = serde_json::json!({"model_params": params, "batch_id": row.id,
                                     "username": identity.username});
        let task = cold
            .client
            .submit(&endpoint, &function, &[arg])
            .await
            .map_err(|e| e.to_string());
        let answer = blocking(batches.clone(), move |b| b.first_submitted(&row, task)).await?;
        Ok(Outcome::Answer(Bytes::from(answer.to_string())))
    }

    /// For a batch line this process sent itself (its secret and batch id in the headers):
    /// the batch's owner, as whom the line runs. `None` for every other request.
    pub(super) fn batch_line_owner(&self, session: &Session) -> Option<(Identity, String)> {
        let batches = self.batches.as_ref()?;
        let headers = &session.req_header().headers;
        let secret = headers.get(LINE_HEADER)?;
        let id = headers.get(LINE_BATCH_HEADER)?.to_str().ok()?;
        let owner = batches.line_owner(secret.as_bytes(), id)?;
        Some((owner.identity(), id.to_string()))
    }
}

fn header(session: &Session, name: &str) -> Option<String> {
    session
        .req_header()
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Runs a store call on the blocking pool.
async fn blocking<T: Send + 'static>(
    batches: Arc<Batches>,
    f: impl FnOnce(&Batches) -> Result<T, BatchError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(move || f(&batches))
        .await
        .map_err(|_| errors::batch(BatchError::Internal))?
        .map_err(errors::batch)
}

/// The parts of a `POST /v1/files` form.
struct Upload {
    filename: String,
    purpose: String,
    file: Bytes,
}

async fn multipart(content_type: Option<&str>, body: Bytes) -> Result<Upload, ApiError> {
    let boundary = content_type
        .and_then(|ct| multer::parse_boundary(ct).ok())
        .ok_or_else(|| {
            ApiError::invalid_request(
                "Upload the file as multipart/form-data with the fields `file` and `purpose`.",
            )
        })?;
    let stream = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(body) });
    let mut form = multer::Multipart::new(stream, boundary);
    let (mut filename, mut purpose, mut file) = (None, None, None);
    let bad = |e: multer::Error| {
        ApiError::invalid_request(format!("The multipart form is malformed: {e}"))
    };
    while let Some(field) = form.next_field().await.map_err(bad)? {
        match field.name() {
            Some("file") => {
                filename = Some(field.file_name().unwrap_or("upload.jsonl").to_string());
                file = Some(field.bytes().await.map_err(bad)?);
            }
            Some("purpose") => purpose = Some(field.text().await.map_err(bad)?),
            _ => {}
        }
    }
    let missing = |f: &'static str| {
        ApiError::invalid_request(format!("The form has no `{f}` field.")).with_param(f)
    };
    Ok(Upload {
        filename: filename.ok_or_else(|| missing("file"))?,
        purpose: purpose.ok_or_else(|| missing("purpose"))?,
        file: file.ok_or_else(|| missing("file"))?,
    })
}
