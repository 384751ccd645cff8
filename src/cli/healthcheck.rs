//! `cfq-relay healthcheck`: GET a running relay's /healthz or /readyz, exit 0 on a 200 (a
//! container's HEALTHCHECK without shell, curl or wget).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use cfq_relay::Config;

/// The admin address asked without `--addr` or `--config`.
const DEFAULT_ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9464);

/// Ask `addr`, else the `admin.listen` of the file at `config`, else 127.0.0.1:9464.
pub fn healthcheck(
    config: Option<&Path>,
    addr: Option<SocketAddr>,
    ready: bool,
    timeout: Duration,
) -> ExitCode {
    let addr = match (addr, config) {
        (Some(a), _) => a,
        (None, Some(path)) => match Config::load_admin_listen(path) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("cfq-relay: healthcheck: configuration error: {e}");
                return ExitCode::FAILURE;
            }
        },
        (None, None) => DEFAULT_ADMIN,
    };
    super::runtime(ask(addr, ready, timeout))
}

/// The URL asked of an admin server listening on `addr`: one bound to every address is asked
/// on loopback.
fn probe_url(addr: SocketAddr, ready: bool) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!(
        "http://{}/{}",
        SocketAddr::new(ip, addr.port()),
        if ready { "readyz" } else { "healthz" }
    )
}

/// GET /healthz (or /readyz) on the admin server; `Ok` only for a 200.
async fn ask(addr: SocketAddr, ready: bool, timeout: Duration) -> anyhow::Result<()> {
    let url = probe_url(addr, ready);
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .no_proxy()
        .build()?;
    let resp = client
        .get(&url)
        .send()
        .await
        .with_context(|| format!("healthcheck: {url}"))?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    if status == reqwest::StatusCode::OK {
        println!("{url}: {}", body.trim());
        Ok(())
    } else {
        anyhow::bail!("healthcheck: {url}: {status}: {}", body.trim())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_addresses_are_asked_on_loopback() {
        let url = |a: &str, ready| probe_url(a.parse().unwrap(), ready);
        assert_eq!(url("0.0.0.0:9464", false), "http://127.0.0.1:9464/healthz");
        assert_eq!(url("[::]:9464", true), "http://[::1]:9464/readyz");
        assert_eq!(url("10.1.2.3:80", false), "http://10.1.2.3:80/healthz");
        assert_eq!(DEFAULT_ADMIN.to_string(), "127.0.0.1:9464");
    }
}
