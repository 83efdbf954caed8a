//! The client side of `serve`: requests to a blocksnap server, signed
//! (SigV4) with the AWS keys of the environment, to its EBS direct API
//! (JSON) and its EC2 calls (Query API, XML).
//!
//! Every request is retried on a broken connection or a 5xx answer, with
//! a fresh signature each time; the calls the CLI repeats are idempotent
//! (`PutSnapshotBlock` of the same bytes, `StartSnapshot` with the same
//! `ClientToken`, reads).

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;
use zeroize::Zeroizing;

use crate::error::{Error, ErrorKind, Result};
use crate::id::{AccountId, hex};

pub use super::sigv4::sha256;
use super::sigv4::{self, Request};

/// The EC2 API version the server speaks.
const EC2_VERSION: &str = "2016-11-15";
/// Tries of one request before its error is returned.
const TRIES: u32 = 4;

/// A connection to one server, for one region and one access key.
pub struct Client {
    base: reqwest::Url,
    host: String,
    region: String,
    key_id: String,
    secret: Zeroizing<String>,
    http: reqwest::blocking::Client,
}

/// An answer with a 2xx status.
pub struct Answer {
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body)
            .map_err(|e| Error::InvalidArgument(format!("the server's answer is not JSON: {e}")))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A request to send.
pub struct Call<'a> {
    /// `ebs` or `ec2`: the service the signature names.
    pub service: &'static str,
    pub method: &'static str,
    /// The path, already encoded.
    pub path: String,
    pub query: Vec<(&'a str, String)>,
    pub headers: Vec<(&'static str, String)>,
    /// Shared, so that a retry sends it again without a copy.
    pub body: Bytes,
    /// The body's SHA-256, where the caller has it already.
    pub body_sha256: Option<[u8; 32]>,
    /// What the request does, for errors: "start a snapshot at".
    pub what: &'static str,
}

impl Client {
    /// A client of the server at `endpoint` (`http://host:port` or
    /// `https://…`) acting in `region`, signing with
    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`; `AWS_CA_BUNDLE`
    /// names a PEM file of certificates to trust besides the system's.
    pub fn from_env(endpoint: &str, region: &str) -> Result<Client> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let (Some(key_id), Some(secret)) = (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY"))
        else {
            return Err(Error::InvalidArgument(format!(
                "--endpoint {endpoint} needs your access key: set AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY (the server's `blocksnap account create` printed them)"
            )));
        };
        let ca = var("AWS_CA_BUNDLE").map(std::path::PathBuf::from);
        Client::new(
            endpoint,
            region,
            &key_id,
            Zeroizing::new(secret),
            ca.as_deref(),
        )
    }

    pub fn new(
        endpoint: &str,
        region: &str,
        key_id: &str,
        secret: Zeroizing<String>,
        ca_bundle: Option<&std::path::Path>,
    ) -> Result<Client> {
        let bad = |why: String| {
            Error::InvalidArgument(format!(
                "--endpoint {endpoint} {why}: give a URL such as http://127.0.0.1:8080"
            ))
        };
        let base = reqwest::Url::parse(endpoint).map_err(|e| bad(format!("is no URL ({e})")))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(bad("is neither http:// nor https://".into()));
        }
        if base.query().is_some() || base.fragment().is_some() || base.path() != "/" {
            return Err(bad("has a path, query or fragment".into()));
        }
        let host = match (base.host_str(), base.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            (None, _) => return Err(bad("names no host".into())),
        };
        let mut builder = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .pool_max_idle_per_host(64);
        if let Some(path) = ca_bundle {
            let pem = std::fs::read(path).map_err(|e| {
                Error::InvalidArgument(format!("cannot read AWS_CA_BUNDLE {}: {e}", path.display()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                Error::InvalidArgument(format!(
                    "AWS_CA_BUNDLE {} holds no PEM certificate: {e}",
                    path.display()
                ))
            })?;
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let http = builder.build().map_err(|e| Error::Remote {
            op: "set up a client of",
            location: endpoint.to_string(),
            reason: e.to_string(),
            kind: ErrorKind::Other,
            source: None,
        })?;
        Ok(Client {
            base,
            host,
            region: region.to_string(),
            key_id: key_id.to_string(),
            secret,
            http,
        })
    }

    /// The same server and key, acting in `region`.
    pub fn in_region(&self, region: &str) -> Client {
        Client {
            base: self.base.clone(),
            host: self.host.clone(),
            region: region.to_string(),
            key_id: self.key_id.clone(),
            secret: self.secret.clone(),
            http: self.http.clone(),
        }
    }

    /// The region requests are signed for.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// The server's URL, for messages.
    pub fn endpoint(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    /// Sends `call`, signed, retrying what may be retried; an answer
    /// other than 2xx is an error carrying the server's code and message.
    pub fn send(&self, call: &Call) -> Result<Answer> {
        let sha = call.body_sha256.unwrap_or_else(|| sha256(&call.body));
        let payload_hash = hex(&sha);
        let query = call
            .query
            .iter()
            .map(|(k, v)| {
                format!(
                    "{}={}",
                    sigv4::uri_encode(k, false),
                    sigv4::uri_encode(v, false)
                )
            })
            .collect::<Vec<_>>()
            .join("&");
        let mut url = self.base.clone();
        url.set_path(&call.path);
        url.set_query((!query.is_empty()).then_some(query.as_str()));
        let mut last = None;
        for attempt in 0..TRIES {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(200 << attempt));
            }
            let headers = self.signed_headers(call, &query, &payload_hash)?;
            let sent = self
                .http
                .request(call.method.parse().expect("a valid method"), url.clone())
                .headers(headers)
                .body(call.body.clone())
                .send();
            let failure = match sent {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let headers = r.headers().clone();
                    match r.bytes() {
                        Ok(body) if (200..300).contains(&status) => {
                            return Ok(Answer { headers, body });
                        }
                        Ok(body) => {
                            let e = self.refusal(call, status, &headers, &body);
                            if status < 500 {
                                return Err(e);
                            }
                            e
                        }
                        Err(e) => self.broken(call, &e),
                    }
                }
                Err(e) => self.broken(call, &e),
            };
            last = Some(failure);
        }
        Err(last.expect("at least one try"))
    }

    fn signed_headers(&self, call: &Call, query: &str, payload_hash: &str) -> Result<HeaderMap> {
        let mut h = HeaderMap::new();
        let mut put = |name: &str, value: &str| {
            let n = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes());
            let v = HeaderValue::from_str(value);
            match (n, v) {
                (Ok(n), Ok(v)) => {
                    h.insert(n, v);
                    Ok(())
                }
                _ => Err(Error::InvalidArgument(format!(
                    "{value:?} cannot be sent as the header {name}"
                ))),
            }
        };
        put("host", &self.host)?;
        put("x-amz-date", &sigv4::format_amz_date(SystemTime::now()))?;
        put("x-amz-content-sha256", payload_hash)?;
        for (k, v) in &call.headers {
            put(k, v)?;
        }
        let names: Vec<String> = h.keys().map(|k| k.as_str().to_string()).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let req = Request {
            method: call.method,
            path: &call.path,
            query,
            headers: &h,
            body: &call.body,
        };
        let auth = sigv4::sign(
            &req,
            &self.key_id,
            &self.secret,
            &self.region,
            call.service,
            &names,
            payload_hash,
        )
        .map_err(|e| Error::InvalidArgument(format!("cannot sign the request: {}", e.message())))?;
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&auth).expect("a signature is ASCII"),
        );
        Ok(h)
    }

    /// The error for a connection that broke or never opened.
    fn broken(&self, call: &Call, e: &reqwest::Error) -> Error {
        let mut reason = e.to_string();
        let mut cause = std::error::Error::source(e);
        while let Some(c) = cause {
            reason = format!("{reason}: {c}");
            cause = c.source();
        }
        let hint = match reason.contains("certificate") {
            true => {
                "set AWS_CA_BUNDLE to the PEM file of the CA that signed the server's \
                     certificate"
            }
            false => "is `blocksnap serve` running there?",
        };
        Error::Remote {
            op: call.what,
            location: self.endpoint().to_string(),
            reason: format!("{reason} ({hint})"),
            kind: ErrorKind::Other,
            source: None,
        }
    }

    /// The error for a refusal: AWS's code and message, in JSON (EBS) or
    /// XML (EC2).
    fn refusal(&self, call: &Call, status: u16, headers: &HeaderMap, body: &[u8]) -> Error {
        let (code, message) = match serde_json::from_slice::<Value>(body) {
            Ok(v) => (
                headers
                    .get("x-amzn-errortype")
                    .and_then(|c| c.to_str().ok())
                    .unwrap_or_default()
                    .to_string(),
                v["Message"]
                    .as_str()
                    .or(v["message"].as_str())
                    .unwrap_or_default()
                    .to_string(),
            ),
            Err(_) => match Xml::parse(body) {
                Ok(x) => {
                    let e = x.find("Error");
                    (
                        e.map(|e| e.text_of("Code")).unwrap_or_default().to_string(),
                        e.map(|e| e.text_of("Message"))
                            .unwrap_or_default()
                            .to_string(),
                    )
                }
                Err(_) => (String::new(), String::from_utf8_lossy(body).into_owned()),
            },
        };
        let kind = match (status, code.as_str()) {
            (_, c) if c.ends_with(".NotFound") || c == "ResourceNotFoundException" => {
                ErrorKind::NotFound
            }
            (403, _) | (401, _) => ErrorKind::Permission,
            (_, "UnauthorizedOperation" | "AuthFailure" | "AccessDeniedException") => {
                ErrorKind::Permission
            }
            (404, _) => ErrorKind::NotFound,
            (409, _) | (_, "IncorrectState" | "ConflictException") => ErrorKind::Conflict,
            (400..=499, _) => ErrorKind::Usage,
            _ => ErrorKind::Other,
        };
        let code = match code.is_empty() {
            true => format!("HTTP {status}"),
            false => code,
        };
        Error::Remote {
            op: call.what,
            location: self.endpoint().to_string(),
            reason: format!("{code}: {message}"),
            kind,
            source: None,
        }
    }

    /// GETs `path` with `query` from `service`.
    pub fn get(
        &self,
        service: &'static str,
        path: &str,
        query: Vec<(&str, String)>,
        what: &'static str,
    ) -> Result<Answer> {
        self.send(&Call {
            service,
            method: "GET",
            path: path.to_string(),
            query,
            headers: Vec::new(),
            body: Bytes::new(),
            body_sha256: None,
            what,
        })
    }

    /// Calls EC2 `action` with `params` and returns its response element.
    pub fn ec2(
        &self,
        action: &str,
        params: &[(String, String)],
        what: &'static str,
    ) -> Result<Xml> {
        let mut form = format!(
            "Action={}&Version={EC2_VERSION}",
            sigv4::uri_encode(action, false)
        );
        for (k, v) in params {
            form.push_str(&format!(
                "&{}={}",
                sigv4::uri_encode(k, false),
                sigv4::uri_encode(v, false)
            ));
        }
        self.post_form("ec2", form, what)
    }

    /// POSTs a Query API form to `/` and parses the XML answer.
    fn post_form(&self, service: &'static str, form: String, what: &'static str) -> Result<Xml> {
        let answer = self.send(&Call {
            service,
            method: "POST",
            path: "/".into(),
            query: Vec::new(),
            headers: vec![(
                "content-type",
                "application/x-www-form-urlencoded; charset=utf-8".into(),
            )],
            body: form.into(),
            body_sha256: None,
            what,
        })?;
        Xml::parse(&answer.body)
    }

    /// The account the access key belongs to (STS `GetCallerIdentity`).
    pub fn account(&self) -> Result<AccountId> {
        let x = self.post_form(
            "sts",
            "Action=GetCallerIdentity&Version=2011-06-15".into(),
            "ask who the access key is at",
        )?;
        Ok(x.find("Account")
            .map(|a| a.text.as_str())
            .unwrap_or_default()
            .parse()?)
    }
}

/// An XML element: its name (without namespace prefix), its text and its
/// child elements. Enough for the answers of EC2's Query API.
#[derive(Debug, Default, Clone)]
pub struct Xml {
    pub name: String,
    pub text: String,
    pub children: Vec<Xml>,
}

impl Xml {
    pub fn parse(bytes: &[u8]) -> Result<Xml> {
        use quick_xml::events::Event;
        let bad =
            |e: String| Error::InvalidArgument(format!("the server's answer is not XML: {e}"));
        let mut reader = quick_xml::Reader::from_reader(bytes);
        let mut stack: Vec<Xml> = vec![Xml::default()];
        let name_of = |n: &[u8]| String::from_utf8_lossy(n).into_owned();
        loop {
            match reader.read_event().map_err(|e| bad(e.to_string()))? {
                Event::Start(e) => stack.push(Xml {
                    name: name_of(e.local_name().as_ref()),
                    ..Default::default()
                }),
                Event::Empty(e) => {
                    let node = Xml {
                        name: name_of(e.local_name().as_ref()),
                        ..Default::default()
                    };
                    stack.last_mut().expect("a root").children.push(node);
                }
                Event::End(_) => {
                    let node = stack.pop().expect("a started element");
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(node),
                        None => return Err(bad("an end tag without its start".into())),
                    }
                }
                Event::Text(t) => {
                    let text = t.decode().map_err(|e| bad(e.to_string()))?;
                    let text =
                        quick_xml::escape::unescape(&text).map_err(|e| bad(e.to_string()))?;
                    stack.last_mut().expect("a root").text.push_str(&text);
                }
                Event::GeneralRef(r) => {
                    let name = r.decode().map_err(|e| bad(e.to_string()))?;
                    let entity = format!("&{name};");
                    let text =
                        quick_xml::escape::unescape(&entity).map_err(|e| bad(e.to_string()))?;
                    stack.last_mut().expect("a root").text.push_str(&text);
                }
                Event::Eof => break,
                _ => {}
            }
        }
        match (stack.pop(), stack.is_empty()) {
            (Some(mut root), true) if root.children.len() == 1 => Ok(root.children.remove(0)),
            _ => Err(bad("not one whole document".into())),
        }
    }

    pub fn child(&self, name: &str) -> Option<&Xml> {
        self.children.iter().find(|c| c.name == name)
    }

    /// The text of child `name`, or "".
    pub fn text_of(&self, name: &str) -> &str {
        self.child(name)
            .map(|c| c.text.as_str())
            .unwrap_or_default()
    }

    /// The `<item>`s of the child `set`.
    pub fn items<'a>(&'a self, set: &str) -> impl Iterator<Item = &'a Xml> + 'a {
        self.child(set)
            .into_iter()
            .flat_map(|s| s.children.iter().filter(|c| c.name == "item"))
    }

    /// The first element named `name`, depth first.
    pub fn find(&self, name: &str) -> Option<&Xml> {
        if self.name == name {
            return Some(self);
        }
        self.children.iter().find_map(|c| c.find(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_answers_parse_into_elements() {
        let x = Xml::parse(
            b"<?xml version=\"1.0\"?>\n<R xmlns=\"x\"><set><item><a>1 &amp; 2</a><b/></item>\
              <item><a>3</a></item></set></R>",
        )
        .unwrap();
        assert_eq!(x.name, "R");
        let items: Vec<_> = x.items("set").collect();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].text_of("a"), "1 & 2");
        assert!(items[0].child("b").is_some());
        assert_eq!(items[1].text_of("a"), "3");
        assert!(Xml::parse(b"<a><b></a>").is_err());
        assert!(Xml::parse(b"not xml").is_err());
    }
}
