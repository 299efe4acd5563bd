//! Edge security: verification of inbound signatures (an HMAC — SHA-256, SHA-1 or SHA-512
//! — over the body or over a signed timestamp and the body, Standard Webhooks, Twilio's, a
//! secret header or query parameter), per-source IP allowlists with trusted proxies, the
//! signing of outbound deliveries (Standard Webhooks, or an HMAC as the inbound one), and
//! the listener's own certificate (`server.tls`). Comparisons of signatures and secrets are constant-time; secrets never
//! appear in errors or logs.

use std::net::IpAddr;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq as _;
use utoipa::ToSchema;

type HmacSha256 = Hmac<Sha256>;

/// The hash of an HMAC scheme (`hmac-sha256`, `hmac-sha1`, `hmac-sha512`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HmacHash {
    Sha256,
    Sha1,
    Sha512,
}

impl HmacHash {
    /// The MAC of `parts` in a row under `key`.
    fn mac(self, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        fn of<M: Mac + hmac::digest::KeyInit>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
            let mut mac = <M as Mac>::new_from_slice(key).expect("HMAC takes any key length");
            for part in parts {
                mac.update(part);
            }
            mac.finalize().into_bytes().to_vec()
        }
        match self {
            HmacHash::Sha256 => of::<HmacSha256>(key, parts),
            HmacHash::Sha1 => of::<Hmac<sha1::Sha1>>(key, parts),
            HmacHash::Sha512 => of::<Hmac<sha2::Sha512>>(key, parts),
        }
    }
}

/// When a certificate (chain) in force stops being valid: the `notBefore` and `notAfter`
/// (seconds since the Unix epoch) of its certificate that expires first — a chain stops
/// working when any of its certificates does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

impl Validity {
    /// The validity of the certificate among these that expires first, or why one is not
    /// an X.509 certificate; `None` for none.
    pub fn of_chain(
        certs: &[rustls::pki_types::CertificateDer<'_>],
    ) -> Result<Option<Self>, String> {
        let mut first: Option<Self> = None;
        for (i, der) in certs.iter().enumerate() {
            let (_, cert) = x509_parser::parse_x509_certificate(der)
                .map_err(|e| format!("certificate {} is not X.509: {e}", i + 1))?;
            let v = cert.validity();
            let this = Self {
                not_before: v.not_before.timestamp(),
                not_after: v.not_after.timestamp(),
            };
            if first.is_none_or(|f| this.not_after < f.not_after) {
                first = Some(this);
            }
        }
        Ok(first)
    }

    /// `not_after` as RFC 3339 text, e.g. `2027-03-01T12:00:00Z`.
    pub fn not_after_text(&self) -> String {
        rfc3339(self.not_after)
    }

    /// What to warn of at `now` (seconds since the Unix epoch), if anything: that it has
    /// expired or is not valid yet, or that it expires within `EXPIRY_WARNING` or a third
    /// of its lifetime, whichever is shorter (so certificates that live a few days, renewed
    /// every day or two, are not always warned of).
    pub fn warning(&self, now: i64) -> Option<String> {
        let at = rfc3339;
        if now >= self.not_after {
            return Some(format!("expired at {}: renew it", at(self.not_after)));
        }
        if now < self.not_before {
            return Some(format!(
                "is not valid before {} (is this machine's clock right?)",
                at(self.not_before)
            ));
        }
        let lifetime = self.not_after - self.not_before;
        let warn_within = (EXPIRY_WARNING.as_secs() as i64).min(lifetime / 3);
        let left = self.not_after - now;
        (left <= warn_within).then(|| {
            format!(
                "expires at {}, in {} h: renew it",
                at(self.not_after),
                left / 3600
            )
        })
    }
}

/// Seconds since the Unix epoch as RFC 3339 text.
fn rfc3339(t: i64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64))
        .to_string()
}

/// How long before a certificate in force expires each load of the config warns of it
/// (unless its lifetime is short: see `Validity::warning`).
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// Logs a warning for each certificate that `Validity::warning` finds something to say of,
/// named by the key that configured it.
pub fn warn_of_expiry<'a>(certificates: impl IntoIterator<Item = (&'a str, Validity)>) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    for (key, validity) in certificates {
        if let Some(warning) = validity.warning(now) {
            tracing::warn!(certificate = key, "The certificate of {key} {warning}.");
        }
    }
}

/// The TLS settings of the listener from `server.tls`'s PEM files — the certificate chain
/// (leaf first) and its private key, HTTP/2 and HTTP/1.1 offered by ALPN — and the chain's
/// validity.
/// The error says which file and what is wrong with it.
pub fn server_tls(
    files: &crate::config::CertificateFiles,
    clients: Option<std::sync::Arc<dyn rustls::server::danger::ClientCertVerifier>>,
) -> Result<(std::sync::Arc<rustls::ServerConfig>, Validity), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let unreadable = |path: &std::path::Path, e: &dyn std::fmt::Display| {
        format!("cannot read {}: {e}", path.display())
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| unreadable(&files.cert, &e))?;
    let Some(validity) =
        Validity::of_chain(&certs).map_err(|e| format!("{}: {e}", files.cert.display()))?
    else {
        return Err(format!("{} holds no PEM certificate", files.cert.display()));
    };
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            format!("{} holds no PEM private key", files.key.display())
        }
        e => unreadable(&files.key, &e),
    })?;
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match clients {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "{} and {} are not a certificate and its private key: {e}",
            files.cert.display(),
            files.key.display()
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((std::sync::Arc::new(config), validity))
}

/// The listener's verifier of client certificates and what it was read from.
pub struct ClientVerifier {
    pub verifier: std::sync::Arc<dyn rustls::server::danger::ClientCertVerifier>,
    /// When the first of the authorities stops being valid.
    pub ca: Validity,
    /// From `thisUpdate` to `nextUpdate` of the revocation list whose next is due first.
    pub crl: Option<Validity>,
}

/// `server.tls.client_ca`: the listener asks each client for a certificate and verifies
/// one against these authorities (PEM, one or more) if it is presented — a certificate
/// they did not issue, or one expired, fails the handshake — but lets clients without one
/// in (probes, the dashboard, senders to sources that do not ask for one); sources with
/// `allow_client_names` turn those away. With `server.tls.client_crl` (PEM revocation lists,
/// each issued by one of the authorities), a certificate a list revokes fails the handshake
/// too; certificates of an authority with no list are not checked, and a list past its
/// `nextUpdate` still applies (its expiry is warned of, like a certificate's). The error
/// names the key (`client_ca` or `client_crl`) and what is wrong.
pub fn client_verifier(
    ca: &std::path::Path,
    crl: Option<&std::path::Path>,
) -> Result<ClientVerifier, (&'static str, String)> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
    let ca_err = |m: String| ("client_ca", format!("{}: {m}", ca.display()));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| ("client_ca", format!("cannot read {}: {e}", ca.display())))?;
    let Some(validity) = Validity::of_chain(&certs).map_err(ca_err)? else {
        return Err(ca_err("holds no PEM certificate".into()));
    };
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in certs.iter().enumerate() {
        (roots.add(cert.clone())).map_err(|e| {
            ca_err(format!(
                "certificate {} is not a usable authority: {e}",
                i + 1
            ))
        })?;
    }
    let (crls, crl_validity) = match crl {
        None => (Vec::new(), None),
        Some(path) => {
            let crl_err = |m: String| ("client_crl", format!("{}: {m}", path.display()));
            let crls: Vec<CertificateRevocationListDer<'static>> =
                CertificateRevocationListDer::pem_file_iter(path)
                    .and_then(|crls| crls.collect::<Result<_, _>>())
                    .map_err(|e| ("client_crl", format!("cannot read {}: {e}", path.display())))?;
            if crls.is_empty() {
                return Err(crl_err("holds no PEM revocation list (X509 CRL)".into()));
            }
            let validity = revocation_lists_validity(&crls, &certs).map_err(crl_err)?;
            (crls, validity)
        }
    };
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        provider,
    )
    .allow_unauthenticated()
    .with_crls(crls)
    .allow_unknown_revocation_status()
    .build()
    .map_err(|e| match e {
        rustls::server::VerifierBuilderError::InvalidCrl(e) => (
            "client_crl",
            format!("{}: {e:?}", crl.unwrap_or(ca).display()),
        ),
        e => ca_err(e.to_string()),
    })?;
    Ok(ClientVerifier {
        verifier,
        ca: validity,
        crl: crl_validity,
    })
}

/// When revocation lists stop being current: the `thisUpdate` and `nextUpdate` of the one
/// whose next is due first (`None` if none says when). A list issued by none of the
/// `authorities` would never apply to a certificate they verify, so it is refused.
fn revocation_lists_validity(
    crls: &[rustls::pki_types::CertificateRevocationListDer<'_>],
    authorities: &[rustls::pki_types::CertificateDer<'_>],
) -> Result<Option<Validity>, String> {
    let subjects: Vec<Vec<u8>> = (authorities.iter())
        .filter_map(|der| x509_parser::parse_x509_certificate(der).ok())
        .map(|(_, cert)| cert.subject().as_raw().to_vec())
        .collect();
    let mut validity: Option<Validity> = None;
    for (i, der) in crls.iter().enumerate() {
        let (_, crl) = x509_parser::parse_x509_crl(der)
            .map_err(|e| format!("revocation list {} is not an X.509 CRL: {e}", i + 1))?;
        if !subjects.iter().any(|s| s == crl.issuer().as_raw()) {
            return Err(format!(
                "revocation list {} is issued by `{}`, not one of server.tls.client_ca's authorities",
                i + 1,
                crl.issuer()
            ));
        }
        let Some(next) = crl.next_update() else {
            continue;
        };
        let this = Validity {
            not_before: crl.last_update().timestamp(),
            not_after: next.timestamp(),
        };
        if validity.is_none_or(|v| this.not_after < v.not_after) {
            validity = Some(this);
        }
    }
    Ok(validity)
}

/// What the listener learnt of a sender from its verified client certificate: the names
/// `allow_client_names` is matched against (its subject alternative names' DNS names and
/// its subject's common name), kept with each of the connection's requests.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClientCertificate {
    pub names: Vec<String>,
}

impl ClientCertificate {
    /// The names of a certificate the TLS handshake has verified (`None` if it cannot be
    /// parsed, which verification would have refused).
    pub fn of(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let mut names: Vec<String> = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                    names.push((*dns).to_string());
                }
            }
        }
        for cn in cert.subject().iter_common_name() {
            if let Ok(cn) = cn.as_str() {
                names.push(cn.to_string());
            }
        }
        Some(Self { names })
    }
}

/// Whether a sender with this client certificate (none: it presented none) may post to a
/// source with these allowed names (none: everyone). Names compare without regard to case.
pub fn allowed_client(
    client: Option<&ClientCertificate>,
    allowed: Option<&[String]>,
) -> Result<(), EdgeError> {
    let Some(allowed) = allowed else {
        return Ok(());
    };
    let Some(client) = client else {
        return Err(EdgeError::NoClientCertificate);
    };
    let matches = |n: &String| allowed.iter().any(|a| a.eq_ignore_ascii_case(n));
    if client.names.iter().any(matches) {
        Ok(())
    } else {
        Err(EdgeError::ClientNameDenied(client.names.join(", ")))
    }
}

/// How a source's requests are authenticated.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(tag = "scheme", rename_all = "kebab-case", deny_unknown_fields)]
pub enum VerifyConfig {
    /// An HMAC-SHA256 of the raw body in a header (e.g. Bondio's `bondio-signature`,
    /// GitHub's `x-hub-signature-256`), or of the body with a timestamp to refuse replays
    /// (Slack's `v0:{timestamp}:{body}`, Stripe's `t=…,v1=…`).
    HmacSha256(HmacVerify),
    /// The same with SHA-1, for senders that still sign with it (Intercom's and GitHub's
    /// older `x-hub-signature: sha1=…`, Trello's).
    HmacSha1(HmacVerify),
    /// The same with SHA-512 (Paystack's `x-paystack-signature`).
    HmacSha512(HmacVerify),
    /// Standard Webhooks: `webhook-id`, `webhook-timestamp`, `webhook-signature`.
    StandardWebhooks {
        /// `whsec_…` secrets; several during a rotation (never shown in full by the API).
        secrets: Vec<String>,
        /// How far the timestamp may be from now, e.g. `5m`.
        #[serde(default = "default_tolerance", with = "humantime_serde")]
        #[schema(value_type = String, example = "5m")]
        tolerance: Duration,
    },
    /// A shared secret as a header's whole value: an API key (`x-api-key: …`), a bearer
    /// token or HTTP Basic credentials (`authorization: Bearer …`, `Basic …`) — for senders
    /// that can only add a fixed header (1NCE's webhook headers) or put credentials in
    /// their URL. The header is not stored with the event, so it is neither shown nor
    /// forwarded to destinations.
    Header {
        /// The header that carries it.
        header: String,
        /// The values accepted; several during a rotation (never shown in full by the API).
        secrets: Vec<String>,
    },
    /// A shared secret in a query parameter of the URL the sender posts to
    /// (`…/v1/ingest/onomondo?token=…`) — for senders that can neither sign nor add a
    /// header, only be given a URL. Weaker than a header: a URL is more often logged on
    /// the way (proxies, the sender's own tools); prefer `header` or a signature where the
    /// sender allows. The parameter is not stored with the event.
    Query {
        /// The query parameter that carries it, e.g. `token`.
        param: String,
        /// The values accepted; several during a rotation (never shown in full by the API).
        secrets: Vec<String>,
    },
    /// Twilio's `x-twilio-signature` (Super SIM's and Programmable Wireless' callbacks,
    /// Event Streams): the base64 HMAC-SHA1, under the account's auth token, of the URL
    /// Twilio requested followed by the form body's parameters sorted by name (each name
    /// then its value) — or, for a JSON body, of the URL alone, whose `bodySHA256`
    /// parameter must then be the body's SHA-256. The URL with and without its default
    /// port is accepted, as Twilio's own validators do.
    Twilio {
        /// The URL as Twilio requests it — the one set in Twilio's console, e.g.
        /// `https://hooks.example.com/v1/ingest/twilio` — without the query, which is taken
        /// from each request as it came.
        url: String,
        /// Auth tokens accepted; two while the account's secondary token is being promoted
        /// (never shown in full by the API).
        secrets: Vec<String>,
    },
    /// No verification.
    None {},
}

/// The fields of the HMAC schemes (`hmac-sha256`, `hmac-sha1`, `hmac-sha512`) of a
/// source's `verify`.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HmacVerify {
    /// The shared secret (never shown in full by the API).
    pub secret: String,
    /// Secrets still accepted during a rotation (never shown in full by the API).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_secrets: Vec<String>,
    /// The header carrying the signature.
    pub header: String,
    #[serde(default)]
    pub encoding: Encoding,
    /// Text before the signature in the header, e.g. `sha256=`.
    #[serde(default)]
    pub prefix: String,
    /// What is signed: `{body}` by default; with a timestamp, e.g. `{timestamp}.{body}`
    /// or `v0:{timestamp}:{body}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed: Option<String>,
    /// The header carrying the signed timestamp (Unix seconds), e.g.
    /// `x-slack-request-timestamp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp_header: Option<String>,
    /// When the signature header lists `key=value` pairs separated by commas (Stripe's
    /// `t=1700000000,v1=…,v1=…`): the key of the signatures, e.g. `v1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature_key: Option<String>,
    /// The key of the timestamp among those pairs, e.g. `t`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp_key: Option<String>,
    /// How far a signed timestamp may be from now, e.g. `5m`.
    #[serde(default = "default_tolerance", with = "humantime_serde")]
    #[schema(value_type = String, example = "5m")]
    pub tolerance: Duration,
}

fn default_tolerance() -> Duration {
    Duration::from_secs(300)
}

/// How an HMAC signature is sent: the fields of the HMAC schemes, the inbound ones (what a
/// sender sends) and the outbound ones (what a delivery carries) alike.
pub struct HmacForm<'a> {
    pub hash: HmacHash,
    pub header: &'a str,
    pub encoding: Encoding,
    pub prefix: &'a str,
    pub signed: Option<&'a str>,
    pub timestamp_header: Option<&'a str>,
    pub signature_key: Option<&'a str>,
    pub timestamp_key: Option<&'a str>,
}

impl<'a> HmacForm<'a> {
    /// The headers that sign `body` with `keys` at `now_s`: `header` holding the signature
    /// after `prefix` — or, with `signature_key`, as `key=value` pairs, the timestamp's
    /// first under `timestamp_key` and then one signature per key (`t=…,v1=…,v1=…`, as
    /// Stripe signs during a rotation) — and the timestamp in `timestamp_header`. Without
    /// `signature_key` the header holds one signature: the first key's.
    pub fn headers(&self, keys: &[&[u8]], now_s: u64, body: &[u8]) -> Vec<(String, String)> {
        let ts = now_s.to_string();
        let signature = |key: &[u8]| {
            let mac = hmac_of(self.hash, key, self.signed, Some(&ts), body);
            format!("{}{}", self.prefix, self.encoding.encode(&mac))
        };
        let value = match self.signature_key {
            Some(name) => {
                let stamp = self.timestamp_key.map(|t| format!("{t}={ts}"));
                let signatures = keys.iter().map(|k| format!("{name}={}", signature(k)));
                stamp
                    .into_iter()
                    .chain(signatures)
                    .collect::<Vec<_>>()
                    .join(",")
            }
            None => keys.first().map(|k| signature(k)).unwrap_or_default(),
        };
        let mut headers = vec![(self.header.to_string(), value)];
        headers.extend(self.timestamp_header.map(|h| (h.to_string(), ts)));
        headers
    }

    /// Whether the fields fit together: header names, a timestamp from one place and
    /// signed (see [`check_signed`]); the field at fault and why.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        for (field, name) in [
            ("header", Some(self.header)),
            ("timestamp_header", self.timestamp_header),
        ] {
            if let Some(name) = name
                && http::HeaderName::from_bytes(name.as_bytes()).is_err()
            {
                return Err((field, format!("`{name}` is not a header name")));
            }
        }
        if self.timestamp_key.is_some() && self.signature_key.is_none() {
            return Err((
                "timestamp_key",
                "needs `signature_key` (the header's pairs)".into(),
            ));
        }
        if self.timestamp_key.is_some() && self.timestamp_header.is_some() {
            return Err((
                "timestamp_key",
                "give the timestamp's `timestamp_header` or its `timestamp_key`, not both".into(),
            ));
        }
        check_signed(
            self.signed,
            self.timestamp_header.is_some() || self.timestamp_key.is_some(),
            "`timestamp_header` or `timestamp_key`",
        )
        .map_err(|m| ("signed", m))
    }

    /// What a request's headers carry, read as [`Self::headers`] writes it: the signatures
    /// (decoded; several where the pairs list several) and the timestamp with the header
    /// it came in, if this form carries one.
    fn read<'h>(
        &self,
        headers: &'h http::HeaderMap,
    ) -> Result<(Vec<Vec<u8>>, Option<Stamp<'h>>), EdgeError>
    where
        'a: 'h,
    {
        let value = header_str(headers, self.header)?;
        let malformed = || EdgeError::Malformed(self.header.into());
        let (given, mut timestamp) = match self.signature_key {
            None => (vec![value], None),
            Some(key) => {
                let pairs = || (value.split(',')).filter_map(|p| p.trim().split_once('='));
                let given = (pairs().filter(|(k, _)| *k == key).map(|(_, v)| v)).collect();
                let timestamp = match self.timestamp_key {
                    None => None,
                    Some(t) => Some(
                        (pairs()
                            .find(|(k, _)| *k == t)
                            .map(|(_, v)| (v, self.header)))
                        .ok_or_else(malformed)?,
                    ),
                };
                (given, timestamp)
            }
        };
        if let Some(name) = self.timestamp_header {
            timestamp = Some((header_str(headers, name)?, name));
        }
        let given: Vec<Vec<u8>> = (given.iter())
            .filter_map(|g| g.strip_prefix(self.prefix))
            .filter_map(|g| self.encoding.decode(g.trim()))
            .collect();
        if given.is_empty() {
            return Err(malformed());
        }
        Ok((given, timestamp))
    }
}

/// A timestamp as a request carries it, and the header it came in.
type Stamp<'h> = (&'h str, &'h str);

/// What a request carries to pass a source's check (see [`VerifyConfig::credentials`]).
#[derive(Debug, Default)]
pub struct Credentials {
    pub headers: Vec<(String, String)>,
    /// A query parameter's name and value (not encoded).
    pub query: Option<(String, String)>,
}

/// How an HMAC signature is written in its header.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    #[default]
    Hex,
    Base64,
}

/// Why a request was refused at the edge. The text is safe to show to the sender.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EdgeError {
    #[error("missing signature header `{0}`")]
    Missing(String),
    #[error("malformed `{0}` header")]
    Malformed(String),
    #[error("the signature does not match")]
    Mismatch,
    #[error(
        "the signed timestamp is outside the tolerance of {0:?} (a replay, or the sender's clock is off)"
    )]
    Stale(Duration),
    #[error("address {0} is not allowed for this source")]
    AddressDenied(IpAddr),
    #[error("this source requires a client certificate")]
    NoClientCertificate,
    #[error("the client certificate ({0}) is not allowed for this source")]
    ClientNameDenied(String),
    #[error("missing header `{0}`")]
    MissingSecret(String),
    #[error("the `{0}` header does not hold an accepted secret")]
    WrongSecret(String),
    #[error("missing query parameter `{0}`")]
    MissingParam(String),
    #[error("the `{0}` query parameter does not hold an accepted secret")]
    WrongParam(String),
}

impl VerifyConfig {
    /// Checks the config's secrets once, at load.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            VerifyConfig::HmacSha256(h)
            | VerifyConfig::HmacSha1(h)
            | VerifyConfig::HmacSha512(h) => {
                if h.secret.is_empty() || h.previous_secrets.iter().any(String::is_empty) {
                    return Err("`secret` and `previous_secrets` must not be empty".into());
                }
                let form = self.hmac_form().expect("an hmac scheme");
                form.check().map_err(|(field, m)| format!("`{field}`: {m}"))
            }
            VerifyConfig::StandardWebhooks { secrets, .. } => {
                if secrets.is_empty() {
                    return Err("`secrets` must list at least one whsec_ secret".into());
                }
                for (i, s) in secrets.iter().enumerate() {
                    decode_secret(s).map_err(|e| format!("`secrets[{i}]`: {e}"))?;
                }
                Ok(())
            }
            VerifyConfig::Header { header, secrets } => {
                reqwest::header::HeaderName::from_bytes(header.as_bytes())
                    .map_err(|_| format!("`header`: `{header}` is not a header name"))?;
                if secrets.is_empty() {
                    return Err("`secrets` must list at least one accepted value".into());
                }
                for (i, s) in secrets.iter().enumerate() {
                    if s.is_empty() || http::HeaderValue::from_str(s).is_err() {
                        return Err(format!(
                            "`secrets[{i}]` must be a header value (visible ASCII, not empty)"
                        ));
                    }
                }
                Ok(())
            }
            VerifyConfig::Query { param, secrets } => {
                if param.is_empty() {
                    return Err("`param` must name the query parameter".into());
                }
                if secrets.is_empty() {
                    return Err("`secrets` must list at least one accepted value".into());
                }
                for (i, s) in secrets.iter().enumerate() {
                    if s.len() < 16 {
                        return Err(format!(
                            "`secrets[{i}]` must be at least 16 characters (anyone may try a URL)"
                        ));
                    }
                }
                Ok(())
            }
            VerifyConfig::Twilio { url, secrets } => {
                let parsed = url::Url::parse(url).map_err(|e| format!("`url`: `{url}`: {e}"))?;
                if !matches!(parsed.scheme(), "https" | "http") || parsed.query().is_some() {
                    return Err(format!(
                        "`url`: `{url}` must be an http(s) URL without a query (the query comes with each request)"
                    ));
                }
                if secrets.is_empty() || secrets.iter().any(String::is_empty) {
                    return Err("`secrets` must list the account's auth token".into());
                }
                Ok(())
            }
            VerifyConfig::None {} => Ok(()),
        }
    }

    /// Whether the event keeps this header of a request: all but the one a `header`
    /// scheme's secret comes in (ingest does not store a sender's credential, and a dry run
    /// shows what ingest would store).
    pub fn keeps(verify: Option<&Self>, name: &http::HeaderName) -> bool {
        match verify {
            Some(VerifyConfig::Header { header, .. }) => {
                !name.as_str().eq_ignore_ascii_case(header)
            }
            _ => true,
        }
    }

    /// The query the event keeps of a request's: all of it but the parameter a `query`
    /// scheme's secret comes in (the others as sent, in their order).
    pub fn kept_query(verify: Option<&Self>, query: &str) -> String {
        match verify {
            Some(VerifyConfig::Query { param, .. }) => (query.split('&'))
                .filter(|pair| !pair.is_empty() && !is_param(pair, param))
                .collect::<Vec<_>>()
                .join("&"),
            _ => query.to_string(),
        }
    }

    /// An HMAC scheme's hash and fields.
    pub fn hmac(&self) -> Option<(HmacHash, &HmacVerify)> {
        match self {
            VerifyConfig::HmacSha256(h) => Some((HmacHash::Sha256, h)),
            VerifyConfig::HmacSha1(h) => Some((HmacHash::Sha1, h)),
            VerifyConfig::HmacSha512(h) => Some((HmacHash::Sha512, h)),
            _ => None,
        }
    }

    /// An HMAC scheme's fields, to change.
    pub fn hmac_mut(&mut self) -> Option<&mut HmacVerify> {
        match self {
            VerifyConfig::HmacSha256(h)
            | VerifyConfig::HmacSha1(h)
            | VerifyConfig::HmacSha512(h) => Some(h),
            _ => None,
        }
    }

    /// How an HMAC scheme's signature is sent.
    fn hmac_form(&self) -> Option<HmacForm<'_>> {
        let (hash, h) = self.hmac()?;
        Some(HmacForm {
            hash,
            header: &h.header,
            encoding: h.encoding,
            prefix: &h.prefix,
            signed: h.signed.as_deref(),
            timestamp_header: h.timestamp_header.as_deref(),
            signature_key: h.signature_key.as_deref(),
            timestamp_key: h.timestamp_key.as_deref(),
        })
    }

    /// What a sender adds to a request of `body` for this check to pass at `now_s` (Unix
    /// seconds): headers, and a query parameter (the `query` scheme's) — with the current
    /// secret (`secret`, the first of `secrets`). The inverse of [`Self::verify`], for
    /// `switchyard send`.
    /// (`content_type`: the body's, and `query`: the request's own query, before any the
    /// credentials add — both of which the `twilio` scheme signs.)
    pub fn credentials(
        &self,
        content_type: Option<&str>,
        query: &str,
        body: &[u8],
        now_s: u64,
    ) -> Credentials {
        let ts = now_s.to_string();
        match self {
            VerifyConfig::None {} => Credentials::default(),
            VerifyConfig::Twilio { url, secrets } => {
                let key = secrets.first().map(String::as_bytes).unwrap_or_default();
                let (signed, query) = match is_form(content_type) {
                    true => (twilio_signed(url, query, Some(body)), None),
                    false => {
                        // (As `switchyard send` adds it: after the request's own query.)
                        let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body));
                        let pair = format!("bodySHA256={hash}");
                        let query = match query.is_empty() {
                            true => pair,
                            false => format!("{query}&{pair}"),
                        };
                        (
                            twilio_signed(url, &query, None),
                            Some(("bodySHA256".into(), hash)),
                        )
                    }
                };
                let mac = HmacHash::Sha1.mac(key, &[signed.as_bytes()]);
                Credentials {
                    headers: vec![(TWILIO_SIGNATURE.into(), B64.encode(mac))],
                    query,
                }
            }
            VerifyConfig::HmacSha256(h)
            | VerifyConfig::HmacSha1(h)
            | VerifyConfig::HmacSha512(h) => {
                let form = self.hmac_form().expect("an hmac scheme");
                Credentials {
                    headers: form.headers(&[h.secret.as_bytes()], now_s, body),
                    query: None,
                }
            }
            VerifyConfig::StandardWebhooks { secrets, .. } => {
                let id = format!("msg_{}", uuid::Uuid::now_v7().simple());
                let key = (secrets.first()).and_then(|s| decode_secret(s).ok());
                let signature = sign(&key.unwrap_or_default(), &id, now_s, body);
                Credentials {
                    headers: vec![
                        ("webhook-id".into(), id),
                        ("webhook-timestamp".into(), ts),
                        ("webhook-signature".into(), signature),
                    ],
                    query: None,
                }
            }
            VerifyConfig::Header { header, secrets } => Credentials {
                headers: vec![(header.clone(), secrets.first().cloned().unwrap_or_default())],
                query: None,
            },
            VerifyConfig::Query { param, secrets } => Credentials {
                headers: Vec::new(),
                query: Some((param.clone(), secrets.first().cloned().unwrap_or_default())),
            },
        }
    }

    /// Verifies a request's signature over `body` (as sent, or as decoded by ingest).
    /// `now_s`: Unix seconds.
    pub fn verify(
        &self,
        headers: &http::HeaderMap,
        query: &str,
        body: &[u8],
        now_s: u64,
    ) -> Result<(), EdgeError> {
        match self {
            VerifyConfig::None {} => Ok(()),
            VerifyConfig::Twilio { url, secrets } => {
                let given = header_str(headers, TWILIO_SIGNATURE)?;
                let given = (B64.decode(given.trim()))
                    .map_err(|_| EdgeError::Malformed(TWILIO_SIGNATURE.into()))?;
                let content_type = headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok());
                let body_hash = (url::form_urlencoded::parse(query.as_bytes()))
                    .find(|(name, _)| name == "bodySHA256")
                    .map(|(_, hash)| hash);
                let params = match body_hash {
                    // A JSON body: signed through its hash in the URL.
                    Some(hash) => {
                        let actual = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body));
                        if !actual.eq_ignore_ascii_case(hash.trim()) {
                            return Err(EdgeError::Mismatch);
                        }
                        None
                    }
                    None => is_form(content_type).then_some(body),
                };
                for url in with_and_without_default_port(url) {
                    let signed = twilio_signed(&url, query, params);
                    for secret in secrets {
                        let mac = HmacHash::Sha1.mac(secret.as_bytes(), &[signed.as_bytes()]);
                        if bool::from(mac.ct_eq(&given)) {
                            return Ok(());
                        }
                    }
                }
                Err(EdgeError::Mismatch)
            }
            VerifyConfig::HmacSha256(h)
            | VerifyConfig::HmacSha1(h)
            | VerifyConfig::HmacSha512(h) => {
                let HmacVerify {
                    secret,
                    previous_secrets,
                    signed,
                    tolerance,
                    ..
                } = h;
                let form = self.hmac_form().expect("an hmac scheme");
                let (given, timestamp) = form.read(headers)?;
                if let Some((ts, name)) = timestamp {
                    let seconds: u64 =
                        (ts.trim().parse()).map_err(|_| EdgeError::Malformed(name.into()))?;
                    if seconds.abs_diff(now_s) > tolerance.as_secs() {
                        return Err(EdgeError::Stale(*tolerance));
                    }
                }
                let ts = timestamp.map(|(ts, _)| ts);
                for key in std::iter::once(secret).chain(previous_secrets) {
                    let mac = hmac_of(form.hash, key.as_bytes(), signed.as_deref(), ts, body);
                    // Constant-time, each one.
                    if given.iter().any(|g| bool::from(mac.ct_eq(g))) {
                        return Ok(());
                    }
                }
                Err(EdgeError::Mismatch)
            }
            VerifyConfig::StandardWebhooks { secrets, tolerance } => {
                let id = header_str(headers, "webhook-id")?;
                let ts_text = header_str(headers, "webhook-timestamp")?;
                let ts: u64 = ts_text
                    .parse()
                    .map_err(|_| EdgeError::Malformed("webhook-timestamp".into()))?;
                if ts.abs_diff(now_s) > tolerance.as_secs() {
                    return Err(EdgeError::Stale(*tolerance));
                }
                let signatures = header_str(headers, "webhook-signature")?;
                let given: Vec<Vec<u8>> = signatures
                    .split(' ')
                    .filter_map(|s| s.strip_prefix("v1,"))
                    .filter_map(|s| B64.decode(s).ok())
                    .collect();
                if given.is_empty() {
                    return Err(EdgeError::Malformed("webhook-signature".into()));
                }
                for secret in secrets {
                    let Ok(key) = decode_secret(secret) else {
                        continue;
                    };
                    for sig in &given {
                        if signed(&key, id, ts, body).verify_slice(sig).is_ok() {
                            return Ok(());
                        }
                    }
                }
                Err(EdgeError::Mismatch)
            }
            VerifyConfig::Header { header, secrets } => {
                let given = (headers.get(header.as_str()))
                    .ok_or_else(|| EdgeError::MissingSecret(header.clone()))?
                    .as_bytes();
                match accepted(secrets, given) {
                    true => Ok(()),
                    false => Err(EdgeError::WrongSecret(header.clone())),
                }
            }
            VerifyConfig::Query { param, secrets } => {
                let given: Vec<_> = (url::form_urlencoded::parse(query.as_bytes()))
                    .filter(|(name, _)| name == param)
                    .map(|(_, value)| value)
                    .collect();
                match given.as_slice() {
                    [] => Err(EdgeError::MissingParam(param.clone())),
                    [one] if accepted(secrets, one.as_bytes()) => Ok(()),
                    _ => Err(EdgeError::WrongParam(param.clone())),
                }
            }
        }
    }
}

impl Encoding {
    /// A signature as written in its header.
    pub fn encode(self, mac: &[u8]) -> String {
        match self {
            Encoding::Hex => hex::encode(mac),
            Encoding::Base64 => B64.encode(mac),
        }
    }

    fn decode(self, text: &str) -> Option<Vec<u8>> {
        match self {
            Encoding::Hex => hex::decode(text).ok(),
            Encoding::Base64 => B64.decode(text).ok(),
        }
    }
}

/// The header Twilio signs its requests in.
const TWILIO_SIGNATURE: &str = "x-twilio-signature";

/// Whether a body of this content type is a form (`application/x-www-form-urlencoded`).
pub(crate) fn is_form(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|t| {
        let essence = t.split(';').next().unwrap_or_default().trim();
        essence.eq_ignore_ascii_case("application/x-www-form-urlencoded")
    })
}

/// What Twilio signs: the URL it requested (`url` and the request's `query`), then a form
/// body's parameters sorted by name and value, each name followed by its value.
fn twilio_signed(url: &str, query: &str, form: Option<&[u8]>) -> String {
    let mut signed = match query.is_empty() {
        true => url.to_string(),
        false => format!("{url}?{query}"),
    };
    if let Some(form) = form {
        let mut params: Vec<_> = url::form_urlencoded::parse(form).collect();
        params.sort();
        for (name, value) in params {
            signed.push_str(&name);
            signed.push_str(&value);
        }
    }
    signed
}

/// `url` as given, and with its port the other way round: without it if it names one,
/// with the scheme's default port if not (Twilio signs the URL as set in its console,
/// which may or may not name the port).
fn with_and_without_default_port(url: &str) -> Vec<String> {
    let mut urls = vec![url.to_string()];
    let Ok(parsed) = url::Url::parse(url) else {
        return urls;
    };
    let (Some(_), Some(default)) = (parsed.host_str(), parsed.port_or_known_default()) else {
        return urls;
    };
    let authority_end = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[authority_end..];
    let path_at = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(path_at);
    let other = match authority
        .rsplit_once(':')
        .filter(|(_, port)| port.parse::<u16>().is_ok())
    {
        Some((without, _)) => without.to_string(),
        None => format!("{authority}:{default}"),
    };
    urls.push(format!("{}{other}{path}", &url[..authority_end]));
    urls
}

/// The HMAC (with `hash`) of what `signed` says is signed: its text before `{body}`, the
/// body, its text after, with `{timestamp}` filled in (the body alone without a template).
pub fn hmac_of(
    hash: HmacHash,
    key: &[u8],
    signed: Option<&str>,
    timestamp: Option<&str>,
    body: &[u8],
) -> Vec<u8> {
    let (before, after) = signed
        .and_then(|t| t.split_once("{body}"))
        .unwrap_or(("", ""));
    let fill = |part: &str| part.replace("{timestamp}", timestamp.unwrap_or(""));
    hash.mac(
        key,
        &[fill(before).as_bytes(), body, fill(after).as_bytes()],
    )
}

/// Checks a `signed` template: `{body}` once, `{timestamp}` if and only if a timestamp is
/// carried (`source` says how one would be), nothing else in braces.
pub fn check_signed(signed: Option<&str>, timestamped: bool, source: &str) -> Result<(), String> {
    let template = signed.unwrap_or("{body}");
    if template.matches("{body}").count() != 1 {
        return Err("must hold `{body}` once".into());
    }
    let rest = template.replace("{body}", "").replace("{timestamp}", "");
    if rest.contains('{') || rest.contains('}') {
        return Err(format!(
            "`{template}` may name only `{{body}}` and `{{timestamp}}`"
        ));
    }
    match (template.contains("{timestamp}"), timestamped) {
        (true, false) => Err(format!(
            "names `{{timestamp}}`: say what carries it ({source})"
        )),
        (false, true) => {
            Err("a timestamp that is not signed proves nothing: name `{timestamp}` here".into())
        }
        _ => Ok(()),
    }
}

/// One of the secrets, compared in constant time with each of them whatever matches.
fn accepted(secrets: &[String], given: &[u8]) -> bool {
    let any = (secrets.iter()).fold(subtle::Choice::from(0), |any, s| {
        any | s.as_bytes().ct_eq(given)
    });
    any.into()
}

/// Whether a `name=value` pair of a query is the parameter `param` (its name decoded).
fn is_param(pair: &str, param: &str) -> bool {
    let name = pair.split_once('=').map_or(pair, |(name, _)| name);
    (url::form_urlencoded::parse(name.as_bytes()).next()).is_some_and(|(n, _)| n == param)
}

fn header_str<'a>(headers: &'a http::HeaderMap, name: &str) -> Result<&'a str, EdgeError> {
    headers
        .get(name)
        .ok_or_else(|| EdgeError::Missing(name.to_string()))?
        .to_str()
        .map_err(|_| EdgeError::Malformed(name.to_string()))
}

/// The key of a `whsec_…` secret (the prefix is optional).
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, String> {
    let b64 = secret.strip_prefix("whsec_").unwrap_or(secret);
    let key = B64
        .decode(b64)
        .map_err(|_| "not a whsec_ secret (base64 after `whsec_`)".to_string())?;
    if key.len() < 16 {
        return Err("a signing secret must be at least 16 bytes".into());
    }
    Ok(key)
}

fn signed(key: &[u8], id: &str, ts: u64, body: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(ts.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `webhook-signature` value for a delivery, per Standard Webhooks.
pub fn sign(key: &[u8], id: &str, ts: u64, body: &[u8]) -> String {
    format!(
        "v1,{}",
        B64.encode(signed(key, id, ts, body).finalize().into_bytes())
    )
}

/// The client's address: the peer, or — only when the peer is a trusted proxy — the
/// rightmost `X-Forwarded-For` entry that is not itself a trusted proxy.
pub fn client_ip(peer: IpAddr, headers: &http::HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    forwarded
        .into_iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .unwrap_or(peer)
}

/// Whether `ip` may post to a source with this allowlist (none: everyone).
pub fn allowed(ip: IpAddr, allowlist: Option<&[IpNet]>) -> Result<(), EdgeError> {
    match allowlist {
        Some(nets) if !nets.iter().any(|n| n.contains(&ip)) => Err(EdgeError::AddressDenied(ip)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_certificate_is_known_by_its_dns_names_and_common_name() {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let names = |name: &str| {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/tls")
                .join(name);
            ClientCertificate::of(&CertificateDer::from_pem_file(path).unwrap())
                .unwrap()
                .names
        };
        // (The server's SANs are `IP:127.0.0.1, DNS:localhost`: the address is no name.)
        assert_eq!(names("server.pem"), ["localhost", "switchyard test server"]);
        assert_eq!(names("client.pem"), ["switchyard test client"]);
        assert_eq!(ClientCertificate::of(b"not DER"), None);

        let client = ClientCertificate {
            names: vec!["sender.example".into()],
        };
        let allowed = ["Sender.Example".to_string()];
        assert!(allowed_client(Some(&client), Some(&allowed)).is_ok());
        assert!(allowed_client(None, None).is_ok());
        assert!(matches!(
            allowed_client(None, Some(&allowed)),
            Err(EdgeError::NoClientCertificate)
        ));
        let other = ["other.example".to_string()];
        assert!(matches!(
            allowed_client(Some(&client), Some(&other)),
            Err(EdgeError::ClientNameDenied(n)) if n == "sender.example"
        ));
    }

    #[test]
    fn a_chain_expires_with_its_first_certificate_to_expire() {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let fixture = |name: &str| {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/tls")
                .join(name);
            CertificateDer::from_pem_file(path).unwrap()
        };
        // (`openssl x509 -noout -dates` of the fixtures: the CA's notAfter is
        // 2126-11-10T20:54:40Z, the server's a second later.)
        let ca = Validity::of_chain(&[fixture("ca.pem")]).unwrap().unwrap();
        assert_eq!(ca.not_after, 4_950_017_680);
        let chain = Validity::of_chain(&[fixture("server.pem"), fixture("ca.pem")]);
        assert_eq!(chain.unwrap(), Some(ca));
        assert_eq!(Validity::of_chain(&[]).unwrap(), None);
        let junk = Validity::of_chain(&[CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])]);
        assert!(junk.unwrap_err().contains("certificate 1 is not X.509"));
    }

    #[test]
    fn certificates_are_warned_of_before_they_expire() {
        let day = 24 * 3600;
        // A 90-day certificate: warned of in its last 14 days.
        let v = Validity {
            not_before: 0,
            not_after: 90 * day,
        };
        assert_eq!(v.warning(76 * day - 1), None);
        let soon = v.warning(76 * day).unwrap();
        assert!(
            soon.starts_with("expires at 1970-04-01T00:00:00Z, in 336 h"),
            "{soon}"
        );
        let expired = v.warning(90 * day).unwrap();
        assert!(expired.starts_with("expired at 1970-04-01"), "{expired}");
        assert!(
            v.warning(-1)
                .unwrap()
                .starts_with("is not valid before 1970-01-01")
        );
        // A 6-day certificate renewed every other day: only in the last third of its life.
        let short = Validity {
            not_before: 0,
            not_after: 6 * day,
        };
        assert_eq!(short.warning(4 * day - 1), None);
        assert!(short.warning(4 * day).is_some());
    }

    #[test]
    fn signatures_match_the_standard_webhooks_test_vector() {
        // The vector published with the Standard Webhooks reference libraries (and Svix's).
        let key = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            sign(
                &key,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn standard_webhooks_verification() {
        let body = br#"{"test": 2432232314}"#;
        let sig = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        let cfg = |secrets: &[&str]| VerifyConfig::StandardWebhooks {
            secrets: secrets.iter().map(|s| s.to_string()).collect(),
            tolerance: Duration::from_secs(300),
        };
        let good = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let other = "whsec_dGhpcyBpcyBhbm90aGVyIHNlY3JldCE=";
        let h = headers(&[
            ("webhook-id", "msg_p5jXN8AQM9LWM0D4loKWxJek"),
            ("webhook-timestamp", "1614265330"),
            ("webhook-signature", &format!("v1,bm9wZQ== {sig}")),
        ]);
        assert_eq!(cfg(&[good]).verify(&h, "", body, 1614265330 + 10), Ok(()));
        assert_eq!(
            cfg(&[other, good]).verify(&h, "", body, 1614265330),
            Ok(()),
            "rotation"
        );
        assert_eq!(
            cfg(&[other]).verify(&h, "", body, 1614265330),
            Err(EdgeError::Mismatch)
        );
        assert_eq!(
            cfg(&[good]).verify(&h, "", b"{}", 1614265330),
            Err(EdgeError::Mismatch)
        );
        assert!(matches!(
            cfg(&[good]).verify(&h, "", body, 1614265330 + 301),
            Err(EdgeError::Stale(_))
        ));
        assert_eq!(
            cfg(&[good]).verify(&headers(&[]), "", body, 0),
            Err(EdgeError::Missing("webhook-id".into()))
        );
    }

    #[test]
    fn hmac_verification_hex_base64_prefix() {
        let body = br#"{"type":"attachment.activated"}"#;
        let mut mac = HmacSha256::new_from_slice(b"key").unwrap();
        mac.update(body);
        let raw = mac.finalize().into_bytes();
        let hex_cfg = hmac(r#"{"secret": "key", "header": "bondio-signature"}"#);
        let h = headers(&[("bondio-signature", &hex::encode(raw))]);
        assert_eq!(hex_cfg.verify(&h, "", body, 0), Ok(()));
        assert_eq!(
            hex_cfg.verify(&h, "", b"tampered", 0),
            Err(EdgeError::Mismatch)
        );
        let b64_cfg = hmac(
            r#"{"secret": "key", "header": "x-sig", "encoding": "base64", "prefix": "sha256="}"#,
        );
        let h = headers(&[("x-sig", &format!("sha256={}", B64.encode(raw)))]);
        assert_eq!(b64_cfg.verify(&h, "", body, 0), Ok(()));
        let h = headers(&[("x-sig", &B64.encode(raw))]);
        assert_eq!(
            b64_cfg.verify(&h, "", body, 0),
            Err(EdgeError::Malformed("x-sig".into()))
        );
    }

    /// `hmac-sha1` and `hmac-sha512` check the published HMACs of the same message (and
    /// `hmac-sha256` its own), and refuse the others' signatures; what they show is what
    /// they were given.
    #[test]
    fn hmac_schemes_check_their_own_hash() {
        let body = b"The quick brown fox jumps over the lazy dog";
        let known = [
            (
                "hmac-sha256",
                "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8",
            ),
            ("hmac-sha1", "de7c9b85b8b78aa6bc8a7a36f70a90701c9db4d9"),
            (
                "hmac-sha512",
                "b42af09057bac1e2d41708e48a902e09b5ff7f12ab428a4fe86653c73dd248fb\
                 82f948a549f7b791a5b41915ee4d1ec3935357e4e2317250d0372afa2ebeeb3a",
            ),
        ];
        for (scheme, _) in known {
            let cfg: VerifyConfig = serde_json::from_value(serde_json::json!({
                "scheme": scheme, "secret": "key", "header": "x-hub-signature", "prefix": "sha=",
            }))
            .unwrap();
            cfg.validate().unwrap();
            assert_eq!(serde_json::to_value(&cfg).unwrap()["scheme"], scheme);
            for (other, mac) in known {
                let h = headers(&[("x-hub-signature", &format!("sha={mac}"))]);
                let expected = if other == scheme {
                    Ok(())
                } else {
                    Err(EdgeError::Mismatch)
                };
                assert_eq!(
                    cfg.verify(&h, "", body, 0),
                    expected,
                    "{scheme} given {other}'s"
                );
            }
            // What `switchyard send` (and a destination) writes passes it.
            let sent = cfg.credentials(None, "", body, 0).headers;
            let given = &sent[0].1;
            assert!(
                known
                    .iter()
                    .any(|(s, mac)| *s == scheme && given == &format!("sha={mac}"))
            );
        }
        let unknown = serde_json::json!({"scheme": "hmac-md5", "secret": "key", "header": "x"});
        assert!(serde_json::from_value::<VerifyConfig>(unknown).is_err());
        let stray =
            serde_json::json!({"scheme": "hmac-sha1", "secret": "k", "header": "x", "nope": 1});
        assert!(serde_json::from_value::<VerifyConfig>(stray).is_err());
    }

    /// Twilio's request signatures, checked against the vectors of Twilio's own Python
    /// library's tests (auth token `12345`): a form body's sorted parameters, a repeated
    /// one, the URL with and without its port, a JSON body through `bodySHA256`.
    #[test]
    fn twilio_signatures_check_twilio_s_own_vectors() {
        let twilio = |url: &str, secrets: &[&str]| {
            let cfg: VerifyConfig = serde_json::from_value(serde_json::json!({
                "scheme": "twilio", "url": url, "secrets": secrets,
            }))
            .unwrap();
            cfg.validate().unwrap();
            cfg
        };
        let cfg = twilio("https://mycompany.com/myapp.php", &["12345"]);
        let form = |signature: &str| {
            headers(&[
                ("x-twilio-signature", signature),
                (
                    "content-type",
                    "application/x-www-form-urlencoded; charset=utf-8",
                ),
            ])
        };
        let query = "foo=1&bar=2";
        let params = b"CallSid=CA1234567890ABCDE&Digits=1234&From=%2B14158675309&To=%2B18005551212&Caller=%2B14158675309";
        let expected = "RSOYDt4T1cUTdK1PDd93/VVr8B8=";
        assert_eq!(cfg.verify(&form(expected), query, params, 0), Ok(()));
        // Signed with the default port in the URL; configured with another port.
        let with_443 = "kvajT1Ptam85bY51eRf/AJRuM3w=";
        assert_eq!(cfg.verify(&form(with_443), query, params, 0), Ok(()));
        let on_a_port = twilio("https://mycompany.com:1234/myapp.php", &["other", "12345"]);
        assert_eq!(on_a_port.verify(&form(expected), query, params, 0), Ok(()));
        // A repeated parameter: each value, in order.
        let repeated = b"Sid=CA123&SidAccount=AC123&Digits=5678&Digits=1234";
        let h = form("IK+Dwps556ElfBT0I3Rgjkr1wJU=");
        assert_eq!(cfg.verify(&h, query, repeated, 0), Ok(()));
        assert_eq!(
            cfg.verify(&form(expected), "foo=1", params, 0),
            Err(EdgeError::Mismatch)
        );
        assert_eq!(
            cfg.verify(&form(expected), query, &params[1..], 0),
            Err(EdgeError::Mismatch)
        );
        // A JSON body: the URL carries its hash, and the URL alone is signed.
        let body = br#"{"property": "value", "boolean": true}"#;
        let hashed = "foo=1&bar=2&bodySHA256=0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620";
        let json = headers(&[
            ("x-twilio-signature", "a9nBmqA0ju/hNViExpshrM61xv4="),
            ("content-type", "application/json"),
        ]);
        assert_eq!(cfg.verify(&json, hashed, body, 0), Ok(()));
        assert_eq!(
            cfg.verify(&json, hashed, b"{}", 0),
            Err(EdgeError::Mismatch),
            "tampered"
        );
        assert_eq!(
            cfg.verify(&headers(&[]), hashed, body, 0),
            Err(EdgeError::Missing("x-twilio-signature".into()))
        );
        assert_eq!(
            cfg.verify(
                &headers(&[("x-twilio-signature", "not base64!")]),
                hashed,
                body,
                0
            ),
            Err(EdgeError::Malformed("x-twilio-signature".into()))
        );
        // What `switchyard send` adds passes, for a form and for JSON.
        // (With a query of the request's own, signed as the gateway will see it.)
        let sent = cfg.credentials(Some("application/x-www-form-urlencoded"), query, params, 0);
        assert_eq!(sent.query, None);
        let h = form(&sent.headers[0].1);
        assert_eq!(cfg.verify(&h, query, params, 0), Ok(()));
        for own in ["", query] {
            let sent = cfg.credentials(None, own, body, 0);
            let (name, hash) = sent.query.unwrap();
            let h = headers(&[("x-twilio-signature", &sent.headers[0].1)]);
            let sent_query = [own, &format!("{name}={hash}")]
                .iter()
                .filter(|q| !q.is_empty())
                .cloned()
                .collect::<Vec<_>>()
                .join("&");
            assert_eq!(cfg.verify(&h, &sent_query, body, 0), Ok(()), "{own}");
        }
        // What cannot work is refused at load.
        for (url, secrets) in [
            ("https://mycompany.com/myapp.php?foo=1", vec!["12345"]),
            ("ftp://mycompany.com/", vec!["12345"]),
            ("not a url", vec!["12345"]),
            ("https://mycompany.com/myapp.php", vec![]),
            ("https://mycompany.com/myapp.php", vec![""]),
        ] {
            let cfg: VerifyConfig = serde_json::from_value(serde_json::json!({
                "scheme": "twilio", "url": url, "secrets": secrets,
            }))
            .unwrap();
            assert!(cfg.validate().is_err(), "{url} {secrets:?}");
        }
    }

    /// An `hmac-sha256` config from its fields as JSON (the API's form), validated.
    fn hmac(fields: &str) -> VerifyConfig {
        let mut v: serde_json::Value = serde_json::from_str(fields).unwrap();
        v["scheme"] = "hmac-sha256".into();
        let cfg: VerifyConfig = serde_json::from_value(v).unwrap();
        cfg.validate().unwrap();
        cfg
    }

    #[test]
    fn hmac_secrets_rotate() {
        let body = b"{}";
        let sign = |key: &[u8]| {
            let mut mac = HmacSha256::new_from_slice(key).unwrap();
            mac.update(body);
            hex::encode(mac.finalize().into_bytes())
        };
        let cfg = hmac(r#"{"secret": "new", "previous_secrets": ["old"], "header": "x-sig"}"#);
        for key in ["new", "old"] {
            let h = headers(&[("x-sig", &sign(key.as_bytes()))]);
            assert_eq!(cfg.verify(&h, "", body, 0), Ok(()), "{key}");
        }
        let h = headers(&[("x-sig", &sign(b"older"))]);
        assert_eq!(cfg.verify(&h, "", body, 0), Err(EdgeError::Mismatch));
    }

    /// Slack's worked example (api.slack.com, "Verifying requests from Slack"): its secret,
    /// timestamp, form body and the signature it gives.
    #[test]
    fn hmac_with_a_timestamp_header_checks_slack_s_example() {
        let body = b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
        let cfg = hmac(
            r#"{"secret": "8f742231b10e8888abcd99yyyzzz85a5", "header": "x-slack-signature",
                "prefix": "v0=", "timestamp_header": "x-slack-request-timestamp",
                "signed": "v0:{timestamp}:{body}"}"#,
        );
        let sig = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";
        let at = |ts: &str| {
            headers(&[
                ("x-slack-signature", sig),
                ("x-slack-request-timestamp", ts),
            ])
        };
        let ts = 1531420618;
        assert_eq!(cfg.verify(&at("1531420618"), "", body, ts + 299), Ok(()));
        assert_eq!(
            cfg.verify(&at("1531420618"), "", body, ts + 301),
            Err(EdgeError::Stale(Duration::from_secs(300))),
            "a replay after the tolerance"
        );
        assert_eq!(
            cfg.verify(&at("1531420619"), "", body, ts),
            Err(EdgeError::Mismatch),
            "the timestamp is signed"
        );
        assert_eq!(
            cfg.verify(&at("soon"), "", body, ts),
            Err(EdgeError::Malformed("x-slack-request-timestamp".into()))
        );
        let h = headers(&[("x-slack-signature", sig)]);
        assert_eq!(
            cfg.verify(&h, "", body, ts),
            Err(EdgeError::Missing("x-slack-request-timestamp".into()))
        );
    }

    /// A Stripe-style header: `t=…,v1=…`, one `v1` per secret during a rotation. The
    /// signature was computed apart, with Python's `hmac`:
    /// `hmac.new(b"whsec_test_secret", b'1700000000.{"id":"evt_1"}', sha256).hexdigest()`.
    #[test]
    fn hmac_with_key_value_pairs_checks_a_stripe_style_header() {
        let body = br#"{"id":"evt_1"}"#;
        let sig = "248a374f50f943a28b0f6ab50faf9a7e7e29b710fa26df9fb1618b9bf8ea9c9a";
        let cfg = hmac(
            r#"{"secret": "whsec_test_secret", "header": "stripe-signature",
                "signature_key": "v1", "timestamp_key": "t", "signed": "{timestamp}.{body}",
                "tolerance": "10m"}"#,
        );
        let h = |v: &str| headers(&[("stripe-signature", v)]);
        let good = format!("t=1700000000,v1={},v1={sig},v0=ignored", "00".repeat(32));
        assert_eq!(cfg.verify(&h(&good), "", body, 1700000000 + 599), Ok(()));
        assert_eq!(
            cfg.verify(&h(&good), "", body, 1700000000 - 601),
            Err(EdgeError::Stale(Duration::from_secs(600)))
        );
        assert_eq!(
            cfg.verify(&h(&format!("t=1700000001,v1={sig}")), "", body, 1700000000),
            Err(EdgeError::Mismatch)
        );
        assert_eq!(
            cfg.verify(&h(&format!("v1={sig}")), "", body, 1700000000),
            Err(EdgeError::Malformed("stripe-signature".into())),
            "no timestamp"
        );
        assert_eq!(
            cfg.verify(&h("t=1700000000,v0=abc"), "", body, 1700000000),
            Err(EdgeError::Malformed("stripe-signature".into())),
            "no signature under the key"
        );
    }

    #[test]
    fn hmac_configs_that_cannot_work_are_refused_at_load() {
        let refused = |fields: &str| {
            let mut v: serde_json::Value = serde_json::from_str(fields).unwrap();
            v["scheme"] = "hmac-sha256".into();
            v["header"] = "x-sig".into();
            let cfg: VerifyConfig = serde_json::from_value(v).unwrap();
            cfg.validate().unwrap_err()
        };
        let cases = [
            (r#"{"secret": ""}"#, "must not be empty"),
            (
                r#"{"secret": "k", "previous_secrets": [""]}"#,
                "must not be empty",
            ),
            (
                r#"{"secret": "k", "signed": "{timestamp}"}"#,
                "`{body}` once",
            ),
            (
                r#"{"secret": "k", "signed": "{body}{body}"}"#,
                "`{body}` once",
            ),
            (
                r#"{"secret": "k", "signed": "{id}.{body}"}"#,
                "may name only",
            ),
            (
                r#"{"secret": "k", "signed": "{timestamp}.{body}"}"#,
                "say what carries it",
            ),
            (
                r#"{"secret": "k", "timestamp_header": "x-ts"}"#,
                "name `{timestamp}`",
            ),
            (
                r#"{"secret": "k", "timestamp_key": "t", "signed": "{timestamp}{body}"}"#,
                "needs `signature_key`",
            ),
            (
                r#"{"secret": "k", "timestamp_header": "a b", "signed": "{timestamp}{body}"}"#,
                "`timestamp_header`",
            ),
        ];
        for (fields, says) in cases {
            let error = refused(fields);
            assert!(error.contains(says), "{fields}: {error}");
        }
    }

    /// What `switchyard send` adds passes the check, for every scheme and form.
    #[test]
    fn credentials_pass_their_own_check() {
        let configs = [
            r#"{"scheme": "none"}"#,
            r#"{"scheme": "hmac-sha256", "secret": "k", "header": "bondio-signature"}"#,
            r#"{"scheme": "hmac-sha256", "secret": "k", "header": "x-sig", "encoding": "base64", "prefix": "sha256="}"#,
            r#"{"scheme": "hmac-sha256", "secret": "k", "header": "x-slack-signature", "prefix": "v0=",
                "timestamp_header": "x-slack-request-timestamp", "signed": "v0:{timestamp}:{body}"}"#,
            r#"{"scheme": "hmac-sha256", "secret": "k", "header": "stripe-signature", "signature_key": "v1",
                "timestamp_key": "t", "signed": "{timestamp}.{body}"}"#,
            r#"{"scheme": "standard-webhooks", "secrets": ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]}"#,
            r#"{"scheme": "header", "header": "x-api-key", "secrets": ["k-0123456789abcdef"]}"#,
            r#"{"scheme": "query", "param": "token", "secrets": ["q-0123456789abcdef&=+"]}"#,
        ];
        let body = br#"{"type":"usage"}"#;
        for config in configs {
            let cfg: VerifyConfig = serde_json::from_str(config).unwrap();
            cfg.validate().unwrap();
            let sent = cfg.credentials(None, "", body, 1_700_000_000);
            let pairs: Vec<(&str, &str)> = sent
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let query = (sent.query.iter())
                .fold(
                    url::form_urlencoded::Serializer::new(String::new()),
                    |mut q, (k, v)| {
                        q.append_pair(k, v);
                        q
                    },
                )
                .finish();
            let checked = cfg.verify(&headers(&pairs), &query, body, 1_700_000_000 + 10);
            assert_eq!(checked, Ok(()), "{config}: {sent:?}");
            let tampered = cfg.verify(&headers(&pairs), &query, b"{}", 1_700_000_000);
            let keyed = matches!(
                cfg,
                VerifyConfig::Header { .. } | VerifyConfig::Query { .. } | VerifyConfig::None {}
            );
            assert_eq!(tampered.is_ok(), keyed, "{config}");
        }
    }

    #[test]
    fn a_query_secret_is_one_of_those_accepted_and_not_kept() {
        let cfg = VerifyConfig::Query {
            param: "token".into(),
            secrets: vec!["new-0123456789ab+/".into(), "old-0123456789abcd".into()],
        };
        assert_eq!(cfg.validate(), Ok(()));
        let check = |query: &str| cfg.verify(&headers(&[]), query, b"{}", 0);
        // As sent, percent-encoded, among other parameters; the old secret during a rotation.
        for query in [
            "token=new-0123456789ab%2B%2F",
            "a=1&token=old-0123456789abcd&b=2",
        ] {
            assert_eq!(check(query), Ok(()), "{query}");
        }
        let wrong = Err(EdgeError::WrongParam("token".into()));
        assert_eq!(check("token=new-0123456789ab"), wrong);
        assert_eq!(
            check("token=old-0123456789abcd&token=nope"),
            wrong,
            "only one, not any of several"
        );
        assert_eq!(
            check("tokens=old-0123456789abcd"),
            Err(EdgeError::MissingParam("token".into()))
        );
        assert_eq!(check(""), Err(EdgeError::MissingParam("token".into())));
        // The event keeps the rest of the query as sent.
        let kept = |q| VerifyConfig::kept_query(Some(&cfg), q);
        assert_eq!(kept("a=1%20x&token=old-0123456789abcd&b=2"), "a=1%20x&b=2");
        assert_eq!(kept("to%6Ben=x&b"), "b", "the name is decoded");
        assert_eq!(VerifyConfig::kept_query(None, "token=x"), "token=x");
        let short = VerifyConfig::Query {
            param: "token".into(),
            secrets: vec!["guessable".into()],
        };
        assert!(short.validate().unwrap_err().contains("at least 16"));
    }

    #[test]
    fn a_header_secret_is_one_of_those_accepted_and_not_kept() {
        let cfg = VerifyConfig::Header {
            header: "X-Api-Key".into(),
            secrets: vec!["new-0123456789abcdef".into(), "old-0123456789abcdef".into()],
        };
        assert_eq!(cfg.validate(), Ok(()));
        for secret in ["new-0123456789abcdef", "old-0123456789abcdef"] {
            let h = headers(&[("x-api-key", secret)]);
            assert_eq!(cfg.verify(&h, "", b"{}", 0), Ok(()), "{secret}");
        }
        let wrong = ["new-0123456789abcde", "new-0123456789abcdefg", ""];
        for given in wrong {
            let h = headers(&[("x-api-key", given)]);
            let refused = Err(EdgeError::WrongSecret("X-Api-Key".into()));
            assert_eq!(cfg.verify(&h, "", b"{}", 0), refused, "{given:?}");
        }
        let missing = cfg.verify(
            &headers(&[("authorization", "new-0123456789abcdef")]),
            "",
            b"",
            0,
        );
        assert_eq!(missing, Err(EdgeError::MissingSecret("X-Api-Key".into())));
        assert_eq!(
            missing.unwrap_err().to_string(),
            "missing header `X-Api-Key`"
        );
        let name = |n: &'static str| http::HeaderName::from_static(n);
        assert!(!VerifyConfig::keeps(Some(&cfg), &name("x-api-key")));
        assert!(VerifyConfig::keeps(Some(&cfg), &name("x-other")));
        assert!(VerifyConfig::keeps(None, &name("x-api-key")));

        let bad = |header: &str, secrets: &[&str]| {
            let secrets = secrets.iter().map(|s| s.to_string()).collect();
            (VerifyConfig::Header {
                header: header.into(),
                secrets,
            })
            .validate()
            .unwrap_err()
        };
        assert!(bad("x api", &["s"]).contains("not a header name"));
        assert!(bad("x-api-key", &[]).contains("at least one"));
        assert!(bad("x-api-key", &["s", ""]).contains("`secrets[1]`"));
        assert!(bad("x-api-key", &["line\nbreak"]).contains("`secrets[0]`"));
    }

    #[test]
    fn forwarded_for_is_honoured_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let h = headers(&[("x-forwarded-for", "203.0.113.9, 10.0.0.7")]);
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let stranger: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(
            client_ip(proxy, &h, &trusted),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_ip(stranger, &h, &trusted),
            stranger,
            "a spoofed header is ignored"
        );
        let allow: Vec<IpNet> = vec!["203.0.113.0/24".parse().unwrap()];
        assert_eq!(
            allowed("203.0.113.9".parse().unwrap(), Some(&allow)),
            Ok(())
        );
        assert!(allowed(stranger, Some(&allow)).is_err());
        assert_eq!(allowed(stranger, None), Ok(()));
    }
}

/// The SSRF guard: deliveries never reach loopback, private, link-local (cloud metadata),
/// shared, unspecified or multicast addresses unless a configured network allows them. The
/// check applies to the addresses the client actually connects to — the resolver below
/// hands reqwest only permitted addresses, so a name that re-resolves elsewhere (DNS
/// rebinding) gains nothing — and to IP literals in URLs, which skip the resolver.
///
/// Through a proxy (`delivery.proxy`) the client resolves only the proxy, which the
/// operator chose and which is exempt; the proxy resolves the destination. So each
/// destination name is resolved here before the request and refused if any of its
/// addresses is — the proxy may still resolve it to another address a moment later, so
/// behind a proxy, the proxy's own egress rules are the last word on rebinding.
#[derive(Clone, Debug, Default)]
pub struct SsrfGuard {
    allowed: std::sync::Arc<Vec<IpNet>>,
    /// The host of `delivery.proxy`, if any.
    proxy: Option<std::sync::Arc<str>>,
}

impl SsrfGuard {
    pub fn new(allowed: Vec<IpNet>) -> Self {
        Self {
            allowed: std::sync::Arc::new(allowed),
            proxy: None,
        }
    }

    /// The guard of a client whose requests go through a proxy on `host`.
    pub fn behind_proxy(mut self, host: String) -> Self {
        self.proxy = Some(host.into());
        self
    }

    /// Checks a destination URL before its request: an IP literal always; behind a proxy,
    /// a name too, by resolving it here (without a proxy the resolver checks names).
    pub async fn check_destination(&self, url: &reqwest::Url) -> Result<(), String> {
        self.check_url(url)?;
        let (Some(_), Some(url::Host::Domain(name))) = (&self.proxy, url.host()) else {
            return Ok(());
        };
        let addrs = tokio::net::lookup_host((name, url.port_or_known_default().unwrap_or(0)))
            .await
            .map_err(|e| format!("cannot resolve {name}: {e}"))?;
        let mut any = false;
        for a in addrs {
            self.check(a.ip()).map_err(|e| format!("{name}: {e}"))?;
            any = true;
        }
        match any {
            true => Ok(()),
            false => Err(format!("{name}: no addresses")),
        }
    }

    /// `Err` with the reason when deliveries may not go to `ip`.
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        if self.allowed.iter().any(|n| n.contains(&ip)) {
            return Ok(());
        }
        match refused_kind(ip) {
            Some(kind) => Err(format!(
                "refused by the SSRF guard: {ip} is a {kind} address (allow it in delivery.allowed_networks)"
            )),
            None => Ok(()),
        }
    }

    /// Checks a URL whose host is an IP literal (names are checked at resolution).
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), String> {
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.check(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check(IpAddr::V6(ip)),
            _ => Ok(()),
        }
    }
}

fn refused_kind(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_private() {
                Some("private")
            } else if v4.is_link_local() {
                Some("link-local (cloud metadata)")
            } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
                Some("shared (carrier-grade NAT)")
            } else if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() || o[0] == 0 {
                Some("non-unicast")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return refused_kind(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() || v6.is_multicast() {
                Some("non-unicast")
            } else if (first & 0xfe00) == 0xfc00 {
                Some("private (unique local)")
            } else if (first & 0xffc0) == 0xfe80 {
                Some("link-local")
            } else {
                None
            }
        }
    }
}

impl reqwest::dns::Resolve for SsrfGuard {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if guard.proxy.as_deref() == Some(host.as_str()) {
                // The operator's proxy: wherever it is, it is where deliveries go.
                return Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs);
            }
            let mut refusal = None;
            let permitted: Vec<std::net::SocketAddr> = addrs
                .into_iter()
                .filter(|a| match guard.check(a.ip()) {
                    Ok(()) => true,
                    Err(e) => {
                        refusal = Some(e);
                        false
                    }
                })
                .collect();
            if permitted.is_empty() {
                let reason = refusal.unwrap_or_else(|| "no addresses".into());
                let e: Box<dyn std::error::Error + Send + Sync> =
                    format!("{host}: {reason}").into();
                return Err(e);
            }
            Ok(Box::new(permitted.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod ssrf_tests {
    use super::*;

    #[test]
    fn private_and_metadata_addresses_are_refused_unless_allowed() {
        let guard = SsrfGuard::default();
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(guard.check(ip.parse().unwrap()).is_err(), "{ip}");
        }
        for ip in ["93.184.216.34", "2606:4700::1111"] {
            assert!(guard.check(ip.parse().unwrap()).is_ok(), "{ip}");
        }
        let allowing = SsrfGuard::new(vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(allowing.check("127.0.0.1".parse().unwrap()).is_ok());
        assert!(allowing.check("10.0.0.1".parse().unwrap()).is_err());
        let url = |u: &str| reqwest::Url::parse(u).unwrap();
        assert!(
            guard
                .check_url(&url("http://169.254.169.254/latest/meta-data"))
                .is_err()
        );
        assert!(guard.check_url(&url("http://[::1]:8080/")).is_err());
        assert!(
            guard.check_url(&url("https://fleet.example/x")).is_ok(),
            "names are checked at resolution"
        );
    }
}
