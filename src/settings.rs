//! Settings from the environment (`BLOCKSNAP_*` tuning, and the AWS
//! credential variables an S3 region connects with), as one typed value.
//!
//! The library never reads the environment: the binary parses every
//! variable once at start ([`Settings::from_vars`]), where a malformed
//! value is a usage error naming the variable, and installs the result
//! with [`install`]. Library code reads [`get`]; a program that installs
//! nothing gets the defaults (and no credentials).

use std::sync::OnceLock;
use std::time::Duration;

use crate::error::{Error, Result};

/// Every tuning setting, with its default.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// How long a command waits for a conflicting lock
    /// (`BLOCKSNAP_LOCK_WAIT`, seconds, >= 0).
    pub lock_wait: Duration,
    /// S3 requests in flight (`BLOCKSNAP_S3_INFLIGHT`, 1 to 1024: each
    /// holds a worker thread and its buffers).
    pub s3_inflight: usize,
    /// Seconds before an S3 request is abandoned and retried
    /// (`BLOCKSNAP_S3_TIMEOUT`, > 0).
    pub s3_timeout: Duration,
    /// Retries of a failed S3 request (`BLOCKSNAP_S3_RETRIES`, 0 to 100).
    pub s3_retries: usize,
    /// Age at which a lock object belongs to a dead process
    /// (`BLOCKSNAP_S3_LOCK_STALE`, seconds, > 0).
    pub s3_lock_stale: Duration,
    /// Unreferenced chunks younger than this before gc's lock are kept
    /// (`BLOCKSNAP_S3_GC_GRACE`, seconds, >= 0; default: the stale age).
    pub s3_gc_grace: Option<Duration>,
    /// Print the S3 requests a command sent (`BLOCKSNAP_S3_TRACE`, set).
    pub s3_trace: bool,
    /// What S3 regions connect with.
    pub aws: AwsEnv,
}

/// The AWS variables an S3 region connects with. Never stored in the
/// store; `Debug` does not show the secrets.
#[derive(Clone, Default, PartialEq)]
pub struct AwsEnv {
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key_id: Option<String>,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Option<String>,
    /// `AWS_SESSION_TOKEN`.
    pub session_token: Option<String>,
    /// `AWS_REGION`.
    pub region: Option<String>,
    /// `AWS_ENDPOINT`: the endpoint of a region defined without one.
    pub endpoint: Option<String>,
}

impl std::fmt::Debug for AwsEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |v: &Option<String>| v.as_ref().map(|_| "(set)");
        f.debug_struct("AwsEnv")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &shown(&self.secret_access_key))
            .field("session_token", &shown(&self.session_token))
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

/// The longest duration a setting takes (about 31 years).
const MAX_SECONDS: Duration = Duration::from_secs(1_000_000_000);

impl Default for Settings {
    fn default() -> Self {
        Settings {
            lock_wait: Duration::from_secs(60),
            s3_inflight: 32,
            s3_timeout: Duration::from_secs(60),
            s3_retries: 6,
            s3_lock_stale: Duration::from_secs(300),
            s3_gc_grace: None,
            s3_trace: false,
            aws: AwsEnv::default(),
        }
    }
}

impl Settings {
    /// Settings from variables looked up by `var` (the environment, in the
    /// binary); an unset or empty variable keeps its default.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Settings> {
        let mut s = Settings::default();
        let get = |name: &str| var(name).filter(|v| !v.is_empty());
        let seconds = |name: &str, positive: bool| -> Result<Option<Duration>> {
            let Some(v) = get(name) else { return Ok(None) };
            let parsed = v.trim().parse::<f64>().ok();
            match parsed.and_then(|n| Duration::try_from_secs_f64(n).ok()) {
                // Bounded so that times computed from it (a lock's
                // staleness, gc's grace) cannot overflow.
                Some(d) if (!positive || !d.is_zero()) && d <= MAX_SECONDS => Ok(Some(d)),
                _ => Err(bad(
                    name,
                    &v,
                    if positive {
                        "a number of seconds above 0, at most 1e9"
                    } else {
                        "a number of seconds from 0 to 1e9"
                    },
                )),
            }
        };
        let count = |name: &str, range: std::ops::RangeInclusive<usize>| -> Result<Option<usize>> {
            let Some(v) = get(name) else { return Ok(None) };
            match v.trim().parse::<usize>() {
                Ok(n) if range.contains(&n) => Ok(Some(n)),
                _ => {
                    let expected =
                        format!("a whole number from {} to {}", range.start(), range.end());
                    Err(bad(name, &v, &expected))
                }
            }
        };
        if let Some(d) = seconds("BLOCKSNAP_LOCK_WAIT", false)? {
            s.lock_wait = d;
        }
        if let Some(n) = count("BLOCKSNAP_S3_INFLIGHT", 1..=1024)? {
            s.s3_inflight = n;
        }
        if let Some(d) = seconds("BLOCKSNAP_S3_TIMEOUT", true)? {
            s.s3_timeout = d;
        }
        if let Some(n) = count("BLOCKSNAP_S3_RETRIES", 0..=100)? {
            s.s3_retries = n;
        }
        if let Some(d) = seconds("BLOCKSNAP_S3_LOCK_STALE", true)? {
            s.s3_lock_stale = d;
        }
        s.s3_gc_grace = seconds("BLOCKSNAP_S3_GC_GRACE", false)?;
        s.s3_trace = var("BLOCKSNAP_S3_TRACE").is_some();
        let text = |name: &str| get(name).map(|v| v.to_string());
        s.aws = AwsEnv {
            access_key_id: text("AWS_ACCESS_KEY_ID"),
            secret_access_key: text("AWS_SECRET_ACCESS_KEY"),
            session_token: text("AWS_SESSION_TOKEN"),
            region: text("AWS_REGION"),
            endpoint: text("AWS_ENDPOINT"),
        };
        Ok(s)
    }

    /// How long gc keeps unreferenced S3 chunks written before its lock.
    pub fn gc_grace(&self) -> Duration {
        self.s3_gc_grace.unwrap_or(self.s3_lock_stale)
    }
}

fn bad(name: &str, value: &str, expected: &str) -> Error {
    Error::InvalidArgument(format!(
        "{name}={value:?} is not {expected}: fix or unset it"
    ))
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// Installs the settings for this process; the first call wins.
pub fn install(settings: Settings) {
    let _ = SETTINGS.set(settings);
}

/// The installed settings, or the defaults.
pub fn get() -> &'static Settings {
    SETTINGS.get_or_init(Settings::default)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(pairs: &[(&str, &str)]) -> Result<Settings> {
        Settings::from_vars(|n| {
            pairs
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn defaults_and_values() {
        assert_eq!(from(&[]).unwrap(), Settings::default());
        let s = from(&[
            ("BLOCKSNAP_LOCK_WAIT", "0"),
            ("BLOCKSNAP_S3_INFLIGHT", "8"),
            ("BLOCKSNAP_S3_RETRIES", "0"),
            ("BLOCKSNAP_S3_LOCK_STALE", "2.5"),
            ("BLOCKSNAP_S3_TRACE", "1"),
        ])
        .unwrap();
        assert_eq!(s.lock_wait, Duration::ZERO);
        assert_eq!(s.s3_inflight, 8);
        assert_eq!(s.s3_retries, 0);
        assert_eq!(s.gc_grace(), Duration::from_millis(2500));
        assert!(s.s3_trace);
    }

    #[test]
    fn credentials_are_read_once_and_never_shown() {
        let s = from(&[
            ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
            ("AWS_SECRET_ACCESS_KEY", "very-secret"),
            ("AWS_REGION", ""),
        ])
        .unwrap();
        assert_eq!(s.aws.access_key_id.as_deref(), Some("AKIDEXAMPLE"));
        assert_eq!(s.aws.secret_access_key.as_deref(), Some("very-secret"));
        assert_eq!(s.aws.region, None, "an empty variable is unset");
        let shown = format!("{s:?}");
        assert!(
            shown.contains("AKIDEXAMPLE") && !shown.contains("very-secret"),
            "{shown}"
        );
    }

    #[test]
    fn a_malformed_value_names_its_variable() {
        for (name, value) in [
            ("BLOCKSNAP_LOCK_WAIT", "soon"),
            ("BLOCKSNAP_LOCK_WAIT", "-1"),
            ("BLOCKSNAP_S3_INFLIGHT", "0"),
            ("BLOCKSNAP_S3_INFLIGHT", "2.5"),
            ("BLOCKSNAP_S3_INFLIGHT", "100000000"),
            ("BLOCKSNAP_S3_TIMEOUT", "0"),
            ("BLOCKSNAP_S3_RETRIES", "many"),
            ("BLOCKSNAP_S3_LOCK_STALE", "inf"),
            ("BLOCKSNAP_S3_GC_GRACE", "NaN"),
            ("BLOCKSNAP_LOCK_WAIT", "1e300"),
            ("BLOCKSNAP_S3_LOCK_STALE", "1e10"),
            ("BLOCKSNAP_S3_TIMEOUT", "1e-12"),
        ] {
            let e = from(&[(name, value)]).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
            assert!(e.to_string().contains(name), "{e}");
        }
    }
}
