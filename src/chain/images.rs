//! Image URLs the worker fetches itself (`limits.image_url_hosts`), so that a job showing an
//! image by URL can go to a provider that fetches no URLs (Gemini, Ollama) as image bytes.
//!
//! By default the list is empty and the worker never fetches a job's URL: such a job goes only
//! to entries whose provider fetches URLs itself (CONTRACT section 6, Bounds and trust). An
//! entry of the list is a host (`images.example.com`: HTTPS on its default port) or an origin
//! (`http://10.0.0.5:8080`: exactly that scheme, host and port). A fetch follows no redirects,
//! must answer 2xx with one of the image media types jobs may carry, at most
//! `limits.max_image_bytes`, within 10 s and the job's deadline.

use std::time::Duration;

use base64::Engine as _;
use futures::StreamExt as _;
use reqwest::Url;
use tokio::time::Instant;

use crate::config::{ImageHost, LimitsConfig};
use crate::contract::{GenerateRequest, ImageSource};

/// How long one image may take, at most.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub(crate) struct ImageFetcher {
    allowed: Vec<ImageHost>,
    max_bytes: usize,
    client: Option<reqwest::Client>,
}

impl ImageFetcher {
    pub(crate) fn new(limits: &LimitsConfig) -> Self {
        let allowed: Vec<ImageHost> = limits
            .image_url_hosts
            .iter()
            .filter_map(|e| ImageHost::parse(e))
            .collect();
        // No client (and no connection pool) unless something may be fetched.
        let client = (!allowed.is_empty())
            .then(|| crate::providers::http_client(Duration::from_secs(5)).ok())
            .flatten();
        ImageFetcher {
            allowed,
            max_bytes: limits.max_image_bytes,
            client,
        }
    }

    /// Whether every image URL of `req` is on the allow-list (and there is one).
    pub(crate) fn may_fetch_all(&self, req: &GenerateRequest) -> bool {
        let mut urls = image_urls(req).peekable();
        self.client.is_some()
            && urls.peek().is_some()
            && urls
                .all(|u| Url::parse(u).is_ok_and(|url| self.allowed.iter().any(|a| a.admits(&url))))
    }

    /// `req` with every image URL replaced by the image's bytes. The error names the image
    /// (by host and path, never its query) and what went wrong.
    pub(crate) async fn inline(
        &self,
        req: &GenerateRequest,
        deadline: Instant,
    ) -> Result<GenerateRequest, String> {
        let client = self.client.as_ref().ok_or("no image URL may be fetched")?;
        let mut out = req.clone();
        for message in &mut out.messages {
            for image in &mut message.images {
                if let ImageSource::Url(url) = &image.source {
                    let until = deadline.min(Instant::now() + FETCH_TIMEOUT);
                    let fetched = tokio::time::timeout_at(until, self.fetch(client, url)).await;
                    let name = display(url);
                    image.source = match fetched {
                        Ok(Ok(source)) => source,
                        Ok(Err(e)) => return Err(format!("image {name}: {e}")),
                        Err(_) => return Err(format!("image {name}: took too long")),
                    };
                }
            }
        }
        Ok(out)
    }

    async fn fetch(&self, client: &reqwest::Client, url: &str) -> Result<ImageSource, String> {
        let url = Url::parse(url).map_err(|e| e.to_string())?;
        if !self.allowed.iter().any(|a| a.admits(&url)) {
            return Err("its host is not in limits.image_url_hosts".into());
        }
        let response = client
            .get(url)
            .send()
            .await
            .map_err(|e| format!("fetch failed ({})", e.without_url()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("HTTP {}", status.as_u16()));
        }
        let media_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase())
            .unwrap_or_default();
        if !crate::job::rich::IMAGE_TYPES.contains(&media_type.as_str()) {
            return Err(format!(
                "content type {:?} is not one of {}",
                media_type,
                crate::job::rich::IMAGE_TYPES.join(", ")
            ));
        }
        let too_large = || {
            format!(
                "more than {} bytes (limits.max_image_bytes)",
                self.max_bytes
            )
        };
        if response
            .content_length()
            .is_some_and(|n| n > self.max_bytes as u64)
        {
            return Err(too_large());
        }
        let mut body = response.bytes_stream();
        let mut bytes = Vec::new();
        while let Some(piece) = body.next().await {
            let piece = piece.map_err(|e| format!("body broken ({})", e.without_url()))?;
            if bytes.len() + piece.len() > self.max_bytes {
                return Err(too_large());
            }
            bytes.extend_from_slice(&piece);
        }
        Ok(ImageSource::Data {
            media_type,
            data: base64::engine::general_purpose::STANDARD.encode(&bytes),
        })
    }
}

fn image_urls(req: &GenerateRequest) -> impl Iterator<Item = &str> {
    req.messages
        .iter()
        .flat_map(|m| &m.images)
        .filter_map(|i| match &i.source {
            ImageSource::Url(u) => Some(u.as_str()),
            ImageSource::Data { .. } => None,
        })
}

/// A URL as errors show it: host and path, without query or credentials.
fn display(url: &str) -> String {
    Url::parse(url).map_or_else(
        |_| "(unparsable URL)".to_string(),
        |u| format!("{}{}", u.host_str().unwrap_or_default(), u.path()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_show_host_and_path_only() {
        assert_eq!(
            display("https://u:p@example.com/a/b.png?token=secret"),
            "example.com/a/b.png"
        );
    }
}
