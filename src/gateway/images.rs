//! Image jobs over HTTP (CONTRACT.md section 8): OpenAI's `POST /v1/images/generations`
//! (pictures as `b64_json`, or as a `url` to `GET /v1/images/{job_id}/{file}` here), and
//! the picture itself streamed from the object store to a key of the job's tenant only. The
//! seed API's `POST /v1/image/generate` is in `super::seed`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};

use super::Gateway;
use super::error::ApiError;
use crate::contract::{ImageObject, JobKind, ResultEvent, Status};

/// OpenAI's image generation request (fields this gateway does not use are ignored, as
/// OpenAI's SDKs send some only for some models).
#[derive(Deserialize)]
struct GenerationRequest {
    prompt: String,
    #[serde(default = "default_model")]
    model: String,
    n: Option<u32>,
    size: Option<String>,
    quality: Option<String>,
    response_format: Option<String>,
    output_format: Option<String>,
    background: Option<String>,
    user: Option<String>,
}

/// A request without a model gets the default image route.
fn default_model() -> String {
    "default".into()
}

/// `POST /v1/images/generations`.
pub(crate) async fn generations(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match generations_inner(gw, peer, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn generations_inner(
    gw: Arc<Gateway>,
    peer: SocketAddr,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let admitted = gw.admit(&headers, peer).await?;
    let request: GenerationRequest = gw.body(&headers, body).await?;
    let as_url = match request.response_format.as_deref() {
        None | Some("b64_json") => false,
        Some("url") => true,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "response_format: {other:?} (b64_json or url)"
            )));
        }
    };
    let target = gw
        .catalog
        .resolve(JobKind::Image, &request.model)
        .ok_or_else(|| ApiError::unknown_model(&request.model))?;
    let mut options = serde_json::Map::new();
    let fields = [
        ("n", request.n.map(Value::from)),
        ("size", request.size.map(Value::from)),
        ("quality", request.quality.map(Value::from)),
        ("output_format", request.output_format.map(Value::from)),
        ("background", request.background.map(Value::from)),
    ];
    for (key, value) in fields {
        if let Some(v) = value {
            options.insert(key.into(), v);
        }
    }
    let mut job = json!({"prompt": request.prompt, "options": options,
                         "timeout_ms": gw.timeout_ms(None)});
    target.apply(&mut job);
    if let Some(user) = request.user {
        job["metadata"] = json!({"user": user});
    }
    let mut job = gw
        .submit(JobKind::Image, job, &admitted.tenant, &headers)
        .await?;
    let result = match job.result().await {
        Ok(r) => r,
        Err(e) => return Ok(job.tag(e.into_response())),
    };
    let response = match result.status {
        Status::Ok => {
            let base = as_url.then(|| base_url(&headers));
            match answer(&gw, &result, base.as_deref()).await {
                Ok(v) => axum::Json(v).into_response(),
                Err(e) => e.into_response(),
            }
        }
        Status::Error => ApiError::of_result(&result, chrono::Utc::now()).into_response(),
    };
    Ok(job.tag(response))
}

/// `http(s)://host` as the client reached this gateway (`X-Forwarded-Proto` behind a proxy).
fn base_url(headers: &HeaderMap) -> String {
    let get = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let scheme = get("x-forwarded-proto").unwrap_or("http");
    let host = get("host").unwrap_or("localhost");
    format!("{scheme}://{host}")
}

/// OpenAI's answer: each picture as base64 (read from the bucket), or as a URL here.
async fn answer(gw: &Gateway, r: &ResultEvent, base: Option<&str>) -> Result<Value, ApiError> {
    let mut data = Vec::new();
    for image in r.images.iter().flatten() {
        let mut item = match base {
            Some(base) => json!({"url": format!("{base}/v1/images/{}", image.object)}),
            None => {
                let bytes = gw
                    .client
                    .image_bytes(image)
                    .await
                    .map_err(super::client_error)?;
                json!({"b64_json": base64::engine::general_purpose::STANDARD.encode(bytes)})
            }
        };
        if let Some(p) = &image.revised_prompt {
            item["revised_prompt"] = json!(p);
        }
        data.push(item);
    }
    let made = r
        .attempts
        .iter()
        .rev()
        .find_map(|a| a.images.clone())
        .unwrap_or_default();
    let format = r
        .images
        .iter()
        .flatten()
        .next()
        .map(|i| match i.media_type.as_str() {
            "image/jpeg" => "jpeg",
            "image/webp" => "webp",
            "image/gif" => "gif",
            _ => "png",
        });
    let t = &r.tokens_used;
    let mut answer = json!({"created": r.finished_at.timestamp(), "data": data});
    // What OpenAI's SDKs know how to read: a size `WxH` or auto, a quality of theirs, a
    // format of theirs; usage only when tokens were reported (as OpenAI for gpt-image).
    if let Some(size) = made.size {
        answer["size"] = json!(size);
    }
    if let Some(q) = made
        .quality
        .filter(|q| ["standard", "hd", "low", "medium", "high", "auto"].contains(&q.as_str()))
    {
        answer["quality"] = json!(q);
    }
    if let Some(f) = format.filter(|f| *f != "gif") {
        answer["output_format"] = json!(f);
    }
    if t.total > 0 {
        answer["usage"] = json!({
            "input_tokens": t.input,
            "output_tokens": t.output,
            "total_tokens": t.total,
            "input_tokens_details": {
                "text_tokens": t.input.saturating_sub(t.classes.image_input_tokens),
                "image_tokens": t.classes.image_input_tokens,
            },
        });
    }
    Ok(answer)
}

/// `GET /v1/images/{job_id}/{file}`: a picture of one of the caller's tenant's jobs, streamed
/// from the bucket. Anyone else's, or one that is gone, is 404 (never "exists, not yours").
pub(crate) async fn picture(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((job_id, file)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    match picture_inner(gw, peer, headers, &job_id, &file).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn no_picture() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "not_found",
        "no such picture (it belongs to another tenant, never existed, or has expired)",
    )
}

async fn picture_inner(
    gw: Arc<Gateway>,
    peer: SocketAddr,
    headers: HeaderMap,
    job_id: &str,
    file: &str,
) -> Result<Response, ApiError> {
    let admitted = gw.admit(&headers, peer).await?;
    let id = uuid::Uuid::parse_str(job_id).map_err(|_| no_picture())?;
    // The stored result says whose job it is and which pictures it has.
    let result = gw
        .client
        .stored_result(id)
        .await
        .map_err(super::client_error)?
        .filter(|r| r.tenant == admitted.tenant && r.job_kind == JobKind::Image)
        .ok_or_else(no_picture)?;
    let name = format!("{id}/{file}");
    let image: &ImageObject = result
        .images
        .iter()
        .flatten()
        .find(|i| i.object == name)
        .ok_or_else(no_picture)?;
    let object = gw
        .client
        .image_reader(image)
        .await
        .map_err(super::client_error)?
        .ok_or_else(no_picture)?;
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(object));
    let mut response = (StatusCode::OK, body).into_response();
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&image.media_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(image.bytes));
    // A tenant's picture: no shared cache may keep it.
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=3600"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", image.sha256)) {
        h.insert(header::ETAG, v);
    }
    Ok(response)
}
