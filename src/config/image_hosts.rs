//! `limits.image_url_hosts`: whose image URLs the worker may fetch itself.

use reqwest::Url;

/// One entry of `limits.image_url_hosts`: a host (HTTPS on its default port) or an origin
/// (exactly that scheme, host and port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageHost {
    /// HTTPS on the default port.
    Host(String),
    /// Exactly this scheme, host and port.
    Origin(String, String, u16),
}

impl ImageHost {
    /// An entry of `limits.image_url_hosts`, if valid.
    pub fn parse(entry: &str) -> Option<ImageHost> {
        if entry.contains("://") {
            let url = Url::parse(entry).ok()?;
            let host = url.host_str()?.to_ascii_lowercase();
            let port = url.port_or_known_default()?;
            let scheme = url.scheme();
            matches!(scheme, "http" | "https")
                .then(|| ImageHost::Origin(scheme.to_string(), host, port))
        } else {
            (!entry.is_empty() && !entry.contains(['/', ':', '@']))
                .then(|| ImageHost::Host(entry.to_ascii_lowercase()))
        }
    }

    /// Whether `url` is on this host or origin.
    pub fn admits(&self, url: &Url) -> bool {
        let host = url.host_str().map(str::to_ascii_lowercase);
        match self {
            ImageHost::Host(h) => {
                url.scheme() == "https"
                    && host.as_deref() == Some(h.as_str())
                    && url.port().is_none()
            }
            ImageHost::Origin(scheme, h, port) => {
                url.scheme() == scheme
                    && host.as_deref() == Some(h.as_str())
                    && url.port_or_known_default() == Some(*port)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_hosts_on_https_or_exact_origins() {
        let host = ImageHost::parse("Images.Example.com").unwrap();
        let origin = ImageHost::parse("http://127.0.0.1:8080").unwrap();
        let admits = |a: &ImageHost, u: &str| a.admits(&Url::parse(u).unwrap());
        assert!(admits(&host, "https://images.example.com/cat.png?sig=1"));
        assert!(!admits(&host, "http://images.example.com/cat.png"));
        assert!(!admits(&host, "https://images.example.com:8443/cat.png"));
        assert!(!admits(
            &host,
            "https://images.example.com.evil.net/cat.png"
        ));
        assert!(!admits(
            &host,
            "https://evil.net/images.example.com/cat.png"
        ));
        assert!(admits(&origin, "http://127.0.0.1:8080/a.png"));
        assert!(!admits(&origin, "http://127.0.0.1:8081/a.png"));
        assert!(!admits(&origin, "https://127.0.0.1:8080/a.png"));
        for bad in ["", "a/b", "user@host", "ftp://x", "host:80"] {
            assert!(ImageHost::parse(bad).is_none(), "{bad}");
        }
    }
}
