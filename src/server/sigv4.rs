//! AWS Signature Version 4: checking a request's `Authorization` header by
//! recomputing its signature from the secret of the access key it names,
//! and signing requests the same way (the CLI as a client, and tests).
//!
//! The canonical request is AWS's: method, the path URI-encoded once more
//! (every service but S3 signs the encoded path), the query parameters
//! decoded, encoded by AWS's rules and sorted, the signed headers (in the
//! order the request lists them) lowercased with their values trimmed and
//! inner runs of spaces folded,
//! and the payload's SHA-256 (or `UNSIGNED-PAYLOAD` where the operation
//! allows it, as `PutSnapshotBlock` does).

use aws_lc_rs::{digest, hmac};
use http::HeaderMap;

use crate::id::{AccountId, hex};

pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";
/// How far a request's time may be from the server's clock.
pub const MAX_SKEW_SECS: i64 = 15 * 60;

/// Why a request's signature was refused, with AWS's error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No `Authorization` header, or one that is not SigV4.
    Missing,
    Malformed(String),
    UnknownKey(String),
    SignatureDoesNotMatch,
    Expired {
        skew_secs: i64,
    },
    PayloadHashMismatch,
    UnsignedPayloadRefused,
}

impl AuthError {
    /// AWS's error code.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "MissingAuthenticationToken",
            AuthError::Malformed(_) => "AuthFailure",
            AuthError::UnknownKey(_) => "InvalidClientTokenId",
            AuthError::SignatureDoesNotMatch => "SignatureDoesNotMatch",
            AuthError::Expired { .. } => "RequestExpired",
            AuthError::PayloadHashMismatch => "XAmzContentSHA256Mismatch",
            AuthError::UnsignedPayloadRefused => "AuthFailure",
        }
    }

    /// A message for the client; never holds a secret.
    pub fn message(&self) -> String {
        match self {
            AuthError::Missing => "the request is not signed: sign it with AWS Signature \
                                   Version 4 (an Authorization header) using an access key \
                                   from `blocksnap account create`"
                .into(),
            AuthError::Malformed(why) => format!("the request's signature is malformed: {why}"),
            AuthError::UnknownKey(id) => {
                format!("the access key id {id} is not known to this server")
            }
            AuthError::SignatureDoesNotMatch => "the request signature we calculated does not \
                                                 match the signature you provided: check your \
                                                 secret access key and signing method"
                .into(),
            AuthError::Expired { skew_secs } => format!(
                "the request was signed {skew_secs} s away from the server's clock (at most \
                 {MAX_SKEW_SECS} s allowed): check the client's clock and sign it again"
            ),
            AuthError::PayloadHashMismatch => {
                "the body's SHA-256 is not the x-amz-content-sha256 the request signed".into()
            }
            AuthError::UnsignedPayloadRefused => {
                "this operation needs a signed payload, not UNSIGNED-PAYLOAD".into()
            }
        }
    }
}

/// The parsed `Authorization` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    pub access_key_id: String,
    /// `YYYYMMDD`.
    pub date: String,
    pub region: String,
    pub service: String,
    pub signed_headers: Vec<String>,
    pub signature: String,
}

impl Authorization {
    pub fn scope(&self) -> String {
        format!(
            "{}/{}/{}/aws4_request",
            self.date, self.region, self.service
        )
    }
}

/// Parses `AWS4-HMAC-SHA256 Credential=AKID/DATE/REGION/SERVICE/aws4_request,
/// SignedHeaders=a;b, Signature=HEX`.
pub fn parse_authorization(value: &str) -> Result<Authorization, AuthError> {
    let bad = |why: &str| AuthError::Malformed(why.to_string());
    let rest = value.strip_prefix(ALGORITHM).ok_or(AuthError::Missing)?;
    if !rest.starts_with(' ') {
        return Err(bad(
            "no Credential, SignedHeaders and Signature after the algorithm",
        ));
    }
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (k, v) = part
            .trim()
            .split_once('=')
            .ok_or_else(|| bad("a part of the Authorization header has no '='"))?;
        let slot = match k {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed,
            "Signature" => &mut signature,
            _ => return Err(bad("the Authorization header has an unknown part")),
        };
        if slot.replace(v).is_some() {
            return Err(bad("a part of the Authorization header is repeated"));
        }
    }
    let credential = credential.ok_or_else(|| bad("no Credential"))?;
    let signed = signed.ok_or_else(|| bad("no SignedHeaders"))?;
    let signature = signature.ok_or_else(|| bad("no Signature"))?;
    let parts: Vec<&str> = credential.split('/').collect();
    let [key, date, region, service, "aws4_request"] = parts[..] else {
        return Err(bad(
            "Credential is not ACCESS_KEY/YYYYMMDD/REGION/SERVICE/aws4_request",
        ));
    };
    if key.is_empty()
        || date.len() != 8
        || !date.bytes().all(|b| b.is_ascii_digit())
        || region.is_empty()
        || service.is_empty()
    {
        return Err(bad(
            "Credential is not ACCESS_KEY/YYYYMMDD/REGION/SERVICE/aws4_request",
        ));
    }
    // The canonical request lists the headers in the order given: the
    // signature covers that order. AWS's clients sort by name; curl 7.88
    // sorts `name:value` lines, which puts `x-amz-checksum-algorithm`
    // before `x-amz-checksum`, and its requests verify all the same.
    let signed_headers: Vec<String> = signed.split(';').map(str::to_string).collect();
    if signed_headers.iter().enumerate().any(|(i, h)| {
        h.is_empty()
            || h.bytes()
                .any(|b| b.is_ascii_uppercase() || b.is_ascii_whitespace())
            || signed_headers[..i].contains(h)
    }) || !signed_headers.iter().any(|h| h == "host")
    {
        return Err(bad(
            "SignedHeaders must be lowercase, each once, separated by ';' and include host",
        ));
    }
    if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("Signature is not 64 hex digits"));
    }
    Ok(Authorization {
        access_key_id: key.to_string(),
        date: date.to_string(),
        region: region.to_string(),
        service: service.to_string(),
        signed_headers,
        signature: signature.to_ascii_lowercase(),
    })
}

/// What a verified request says about its sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub account: AccountId,
    pub access_key_id: String,
    /// The credential scope's region: the blocksnap region acted on.
    pub region: String,
    pub service: String,
    /// The body's SHA-256, where the check computed it.
    pub body_sha256: Option<[u8; 32]>,
}

/// A request as the signature covers it.
pub struct Request<'a> {
    pub method: &'a str,
    /// The path as sent, percent-encoded.
    pub path: &'a str,
    /// The query string as sent, without `?`.
    pub query: &'a str,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

/// Checks `req`'s signature at `now` (seconds since the epoch), finding
/// the secret of its access key with `secret_of`. `allow_unsigned`: the
/// operation may sign `UNSIGNED-PAYLOAD` instead of its body's hash.
pub fn verify(
    req: &Request,
    now: i64,
    allow_unsigned: bool,
    secret_of: impl FnOnce(&str) -> Option<(AccountId, String)>,
) -> Result<Caller, AuthError> {
    let auth_value = header(req.headers, "authorization").ok_or(AuthError::Missing)?;
    let auth = parse_authorization(&auth_value)?;
    let amz_date = header(req.headers, "x-amz-date")
        .ok_or_else(|| AuthError::Malformed("no X-Amz-Date header".into()))?;
    let at = parse_amz_date(&amz_date)
        .ok_or_else(|| AuthError::Malformed("X-Amz-Date is not YYYYMMDD'T'HHMMSS'Z'".into()))?;
    if !amz_date.starts_with(&auth.date) {
        return Err(AuthError::Malformed(
            "the Credential's date is not X-Amz-Date's".into(),
        ));
    }
    if !auth.signed_headers.iter().any(|h| h == "x-amz-date") {
        return Err(AuthError::Malformed(
            "SignedHeaders must include x-amz-date".into(),
        ));
    }
    let skew = (now - at).abs();
    if skew > MAX_SKEW_SECS {
        return Err(AuthError::Expired { skew_secs: skew });
    }
    // The body's SHA-256, computed once: an operation that checks it again
    // (`PutSnapshotBlock`'s checksum) takes it from the caller.
    let mut body_sha256 = None;
    let payload_hash = match header(req.headers, "x-amz-content-sha256") {
        Some(v) if v == UNSIGNED_PAYLOAD => {
            if !allow_unsigned {
                return Err(AuthError::UnsignedPayloadRefused);
            }
            v
        }
        given => {
            let d = sha256(req.body);
            body_sha256 = Some(d);
            let body_hash = hex(&d);
            match given {
                Some(v) if v.eq_ignore_ascii_case(&body_hash) => v,
                Some(_) => return Err(AuthError::PayloadHashMismatch),
                None => body_hash,
            }
        }
    };
    let (account, secret) = secret_of(&auth.access_key_id)
        .ok_or_else(|| AuthError::UnknownKey(auth.access_key_id.clone()))?;
    let canonical = canonical_request(req, &auth.signed_headers, &payload_hash)?;
    let expected = signature(&secret, &auth, &amz_date, &canonical);
    if !same(expected.as_bytes(), auth.signature.as_bytes()) {
        return Err(AuthError::SignatureDoesNotMatch);
    }
    Ok(Caller {
        account,
        access_key_id: auth.access_key_id,
        region: auth.region,
        service: auth.service,
        body_sha256,
    })
}

/// Signs a request: returns the `Authorization` header's value for
/// `headers` (which must hold `host` and `x-amz-date`, and every header
/// named in `signed_headers`).
#[allow(clippy::too_many_arguments)]
pub fn sign(
    req: &Request,
    access_key_id: &str,
    secret: &str,
    region: &str,
    service: &str,
    signed_headers: &[&str],
    payload_hash: &str,
) -> Result<String, AuthError> {
    let amz_date = header(req.headers, "x-amz-date")
        .ok_or_else(|| AuthError::Malformed("no X-Amz-Date header".into()))?;
    let mut names: Vec<String> = signed_headers.iter().map(|h| h.to_lowercase()).collect();
    names.sort();
    let auth = Authorization {
        access_key_id: access_key_id.to_string(),
        date: amz_date.get(..8).unwrap_or_default().to_string(),
        region: region.to_string(),
        service: service.to_string(),
        signed_headers: names,
        signature: String::new(),
    };
    let canonical = canonical_request(req, &auth.signed_headers, payload_hash)?;
    let sig = signature(secret, &auth, &amz_date, &canonical);
    Ok(format!(
        "{ALGORITHM} Credential={}/{}, SignedHeaders={}, Signature={sig}",
        access_key_id,
        auth.scope(),
        auth.signed_headers.join(";")
    ))
}

fn signature(secret: &str, auth: &Authorization, amz_date: &str, canonical: &str) -> String {
    let string_to_sign = format!(
        "{ALGORITHM}\n{amz_date}\n{}\n{}",
        auth.scope(),
        hex(&sha256(canonical.as_bytes()))
    );
    let mut key = format!("AWS4{secret}").into_bytes();
    for part in [
        auth.date.as_str(),
        auth.region.as_str(),
        auth.service.as_str(),
        "aws4_request",
    ] {
        key = mac(&key, part.as_bytes());
    }
    hex(&mac(&key, string_to_sign.as_bytes()))
}

/// The SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, data);
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

fn mac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    hmac::sign(&key, data).as_ref().to_vec()
}

/// The canonical request of `req` over `signed` headers.
pub fn canonical_request(
    req: &Request,
    signed: &[String],
    payload_hash: &str,
) -> Result<String, AuthError> {
    let mut out = String::with_capacity(256);
    out.push_str(req.method);
    out.push('\n');
    let path = if req.path.is_empty() { "/" } else { req.path };
    out.push_str(&uri_encode(path, true));
    out.push('\n');
    out.push_str(&canonical_query(req.query)?);
    out.push('\n');
    for name in signed {
        let value = header(req.headers, name).ok_or_else(|| {
            AuthError::Malformed(format!("signed header {name} is not in the request"))
        })?;
        out.push_str(name);
        out.push(':');
        out.push_str(&value);
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&signed.join(";"));
    out.push('\n');
    out.push_str(payload_hash);
    Ok(out)
}

/// The query's parameters, decoded, AWS-encoded and sorted.
fn canonical_query(query: &str) -> Result<String, AuthError> {
    let mut pairs = Vec::new();
    for part in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let decode = |s: &str| percent_encoding::percent_decode_str(s).collect::<Vec<u8>>();
        pairs.push((
            uri_encode_bytes(&decode(k), false),
            uri_encode_bytes(&decode(v), false),
        ));
    }
    pairs.sort();
    Ok(pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&"))
}

/// A header's values, trimmed, inner runs of spaces folded, joined by `,`.
fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    let mut values = headers.get_all(name).iter().peekable();
    values.peek()?;
    let folded: Vec<String> = values
        .map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    Some(folded.join(","))
}

/// `YYYYMMDD'T'HHMMSS'Z'` as seconds since the epoch.
pub fn parse_amz_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let digits = b
        .iter()
        .enumerate()
        .all(|(i, c)| i == 8 || i == 15 || c.is_ascii_digit());
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' || !digits {
        return None;
    }
    let rfc = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[9..11],
        &s[11..13],
        &s[13..15]
    );
    let t = humantime::parse_rfc3339(&rfc).ok()?;
    t.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs() as i64)
}

/// `t` (seconds since the epoch) as `YYYYMMDD'T'HHMMSS'Z'`.
pub fn format_amz_date(t: std::time::SystemTime) -> String {
    let s = humantime::format_rfc3339_seconds(t).to_string();
    // 2015-08-30T12:36:00Z
    s.replace(['-', ':'], "")
}

/// AWS's URI encoding: every byte but `A-Za-z0-9-_.~` (and `/` when
/// `keep_slash`) as `%XX`.
pub fn uri_encode(s: &str, keep_slash: bool) -> String {
    uri_encode_bytes(s.as_bytes(), keep_slash)
}

fn uri_encode_bytes(bytes: &[u8], keep_slash: bool) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Compares in time independent of where the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn account() -> AccountId {
        "123456789012".parse().unwrap()
    }

    /// AWS's published test case `get-vanilla`.
    #[test]
    fn aws_get_vanilla_vector() {
        let h = headers(&[
            ("host", "example.amazonaws.com"),
            ("x-amz-date", "20150830T123600Z"),
            (
                "authorization",
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
                 SignedHeaders=host;x-amz-date, \
                 Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
            ),
        ]);
        let req = Request {
            method: "GET",
            path: "/",
            query: "",
            headers: &h,
            body: b"",
        };
        let now = parse_amz_date("20150830T123600Z").unwrap();
        let caller = verify(&req, now, false, |k| {
            (k == "AKIDEXAMPLE").then(|| (account(), SECRET.to_string()))
        })
        .unwrap();
        assert_eq!(caller.region, "us-east-1");
        assert_eq!(caller.service, "service");
        // Signing gives the same header back.
        let signed = sign(
            &req,
            "AKIDEXAMPLE",
            SECRET,
            "us-east-1",
            "service",
            &["host", "x-amz-date"],
            &hex(&sha256(b"")),
        )
        .unwrap();
        assert!(signed.ends_with(
            "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        ));
    }

    fn signed_request(
        body: &[u8],
        payload: &str,
        query: &str,
        date: &str,
    ) -> (HeaderMap, &'static str) {
        let mut h = headers(&[
            ("host", "localhost:8080"),
            ("x-amz-date", date),
            ("x-amz-content-sha256", payload),
        ]);
        let req = Request {
            method: "PUT",
            path: "/snapshots/snap-0123456789abcdef0/blocks/7",
            query,
            headers: &h,
            body,
        };
        let auth = sign(
            &req,
            "AKIATEST",
            SECRET,
            "local",
            "ebs",
            &["host", "x-amz-date", "x-amz-content-sha256"],
            payload,
        )
        .unwrap();
        h.insert("authorization", HeaderValue::from_str(&auth).unwrap());
        (h, "/snapshots/snap-0123456789abcdef0/blocks/7")
    }

    fn check(
        h: &HeaderMap,
        path: &str,
        query: &str,
        body: &[u8],
        now: i64,
        unsigned: bool,
    ) -> Result<Caller, AuthError> {
        let req = Request {
            method: "PUT",
            path,
            query,
            headers: h,
            body,
        };
        verify(&req, now, unsigned, |k| {
            (k == "AKIATEST").then(|| (account(), SECRET.to_string()))
        })
    }

    #[test]
    fn every_refusal_has_its_code() {
        let date = "20261128T120000Z";
        let now = parse_amz_date(date).unwrap();
        let body = b"block bytes";
        let hash = hex(&sha256(body));
        let (h, path) = signed_request(body, &hash, "a=1&b=x%20y", date);
        assert!(check(&h, path, "b=x%20y&a=1", body, now, false).is_ok());
        // Another body than the one signed.
        assert_eq!(
            check(&h, path, "a=1&b=x%20y", b"other", now, false),
            Err(AuthError::PayloadHashMismatch)
        );
        // Another path or query.
        assert_eq!(
            check(
                &h,
                "/snapshots/snap-0123456789abcdef0/blocks/8",
                "a=1&b=x%20y",
                body,
                now,
                false
            ),
            Err(AuthError::SignatureDoesNotMatch)
        );
        assert_eq!(
            check(&h, path, "a=2&b=x%20y", body, now, false),
            Err(AuthError::SignatureDoesNotMatch)
        );
        // Too old, too new.
        assert!(matches!(
            check(&h, path, "a=1&b=x%20y", body, now + 16 * 60, false),
            Err(AuthError::Expired { .. })
        ));
        assert!(matches!(
            check(&h, path, "a=1&b=x%20y", body, now - 16 * 60, false),
            Err(AuthError::Expired { .. })
        ));
        assert!(check(&h, path, "a=1&b=x%20y", body, now + 14 * 60, false).is_ok());
        // Unknown key.
        let req = Request {
            method: "PUT",
            path,
            query: "a=1&b=x%20y",
            headers: &h,
            body,
        };
        assert_eq!(
            verify(&req, now, false, |_| None),
            Err(AuthError::UnknownKey("AKIATEST".into()))
        );
        // A wrong secret.
        assert_eq!(
            verify(&req, now, false, |_| Some((
                account(),
                "not the secret".into()
            ))),
            Err(AuthError::SignatureDoesNotMatch)
        );
        // Unsigned payloads only where allowed.
        let (h, path) = signed_request(body, UNSIGNED_PAYLOAD, "", date);
        assert_eq!(
            check(&h, path, "", body, now, false),
            Err(AuthError::UnsignedPayloadRefused)
        );
        assert!(check(&h, path, "", b"anything", now, true).is_ok());
        // No signature at all.
        let bare = headers(&[("host", "x"), ("x-amz-date", date)]);
        assert_eq!(
            check(&bare, path, "", body, now, true),
            Err(AuthError::Missing)
        );
    }

    #[test]
    fn malformed_headers_are_refused_not_panicked_on() {
        for bad in [
            "AWS4-HMAC-SHA256",
            "AWS4-HMAC-SHA256 ",
            "AWS4-HMAC-SHA256 Credential=a/b/c/d/aws4_request",
            "AWS4-HMAC-SHA256 Credential=AK/20260101/r/s/aws4_request, SignedHeaders=host, Signature=zz",
            "AWS4-HMAC-SHA256 Credential=AK/2026/r/s/aws4_request, SignedHeaders=host, Signature=00",
            "AWS4-HMAC-SHA256 Credential=AK/20260101/r/s/aws4_request, SignedHeaders=host;x-amz-date;host, Signature=0000000000000000000000000000000000000000000000000000000000000000",
            "AWS4-HMAC-SHA256 Credential=AK/20260101/r/s/aws4_request, SignedHeaders=x-amz-date;Host, Signature=0000000000000000000000000000000000000000000000000000000000000000",
            "AWS4-HMAC-SHA256 Credential=AK/20260101/r/s/aws4_request, Credential=AK/20260101/r/s/aws4_request, SignedHeaders=host, Signature=0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            assert!(
                matches!(parse_authorization(bad), Err(AuthError::Malformed(_))),
                "{bad}"
            );
        }
        assert_eq!(parse_authorization("Basic abc"), Err(AuthError::Missing));
        assert_eq!(parse_amz_date("20261128T120000"), None);
        assert_eq!(parse_amz_date("2026112XT120000Z"), None);
        // Multi-byte characters where digits belong: refused, not sliced.
        assert_eq!(parse_amz_date("2026\u{e9}128T12000Z"), None);
    }

    #[test]
    fn amz_dates_round_trip() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_440_938_160);
        assert_eq!(format_amz_date(t), "20150830T123600Z");
        assert_eq!(parse_amz_date("20150830T123600Z"), Some(1_440_938_160));
    }
}
