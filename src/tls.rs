//! TLS set-up shared by every client in the process (providers' HTTP, the OTLP exporter).

/// reqwest is built with `rustls-no-provider` (ring is already in the tree through async-nats,
/// and aws-lc would need a C toolchain step): install ring once as the process default.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err means another provider was installed first; that one serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
