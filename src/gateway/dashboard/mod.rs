//! `/dashboard`: the usage page, for admin keys, served when `gateway.dashboard` is on.
//!
//! Every figure comes from the queries in `queries.sql` (shown in `docs/dashboard.md`), which
//! read the daily rollups, so the page costs the same on a billion calls as on a thousand;
//! only the most expensive jobs read `llm_jobs` (by an index on cost) and their calls.
//! The page is rendered on the server (`page`), with the chart series as JSON inside it,
//! drawn by `assets/dashboard.js` with uPlot (vendored from npm, `assets/`): no request
//! leaves the gateway, and the page asks for no data of its own (CSP `connect-src 'none'`).
//!
//! Keys: `Authorization: Bearer <admin key>`, or the key sent once through the login form,
//! kept in an `HttpOnly`, `SameSite=Strict` cookie scoped to `/dashboard`. A tenant's key is
//! refused like an unknown one. Refused keys count against the address's limit
//! (`gateway.bad_keys_per_minute`) as on the API.

mod page;
mod queries;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{Datelike, NaiveDate, Utc};
use serde::Deserialize;

use super::Gateway;
use super::error::ApiError;

pub(crate) use queries::Figures;

/// The cookie that carries the admin key of a logged-in browser.
const COOKIE: &str = "llmw_dashboard";
/// How long a login lasts.
const LOGIN_SECS: u64 = 12 * 3600;

/// The page's routes (merged into the gateway's router when the dashboard is on).
pub(crate) fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/dashboard", get(dashboard))
        .route("/dashboard/login", post(login))
        .route("/dashboard/logout", post(logout))
        .route("/dashboard/assets/{name}", get(asset))
}

/// The filters of the page (its query string).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Filters {
    /// `today`, `7d`, `30d` (default), `90d` or `month` (this calendar month, UTC).
    #[serde(default)]
    pub period: Option<String>,
    /// One tenant, or every tenant when absent or empty.
    #[serde(default)]
    pub tenant: Option<String>,
}

/// The periods the page offers: (value, label).
pub(crate) const PERIODS: &[(&str, &str)] = &[
    ("today", "Today"),
    ("7d", "Last 7 days"),
    ("30d", "Last 30 days"),
    ("90d", "Last 90 days"),
    ("month", "This month"),
];

/// A period resolved to UTC days, first and last included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Period {
    pub name: &'static str,
    pub from: NaiveDate,
    pub to: NaiveDate,
}

impl Period {
    /// The period `name` names, ending `today`; `None` for a name the page does not offer.
    pub(crate) fn of(name: Option<&str>, today: NaiveDate) -> Option<Period> {
        let name = match name.filter(|n| !n.is_empty()) {
            None => "30d",
            Some(n) => PERIODS.iter().find(|(v, _)| *v == n)?.0,
        };
        let days_back = |n: u64| today - chrono::Days::new(n - 1);
        let from = match name {
            "today" => today,
            "7d" => days_back(7),
            "90d" => days_back(90),
            "month" => today.with_day(1).unwrap_or(today),
            _ => days_back(30),
        };
        Some(Period {
            name,
            from,
            to: today,
        })
    }
}

/// The key a request carries: its bearer token, else the login cookie.
fn key_of(headers: &HeaderMap) -> Option<String> {
    if let Some(key) = super::bearer(headers) {
        return Some(key.to_string());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_string())
}

/// Whether `key` is an admin key; `Err` for the answer to give when it is not.
async fn check_admin(gw: &Gateway, key: Option<&str>, peer: SocketAddr) -> Result<(), Response> {
    match gw.owner(key, peer).await {
        Ok(owner) if owner.admin => Ok(()),
        Ok(_) => {
            gw.bad_keys.refused(peer.ip());
            Err(login_page(
                StatusCode::UNAUTHORIZED,
                Some("That key is not an admin key."),
            ))
        }
        Err(e) if e.status == StatusCode::UNAUTHORIZED => Err(login_page(
            StatusCode::UNAUTHORIZED,
            key.map(|_| "That key is not valid (or was revoked)."),
        )),
        Err(e) => Err(e.into_response()),
    }
}

/// `GET /dashboard`: the page, or the login form.
async fn dashboard(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    filters: Result<Query<Filters>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let key = key_of(&headers);
    if let Err(refused) = check_admin(&gw, key.as_deref(), peer).await {
        return refused;
    }
    let Ok(Query(filters)) = filters else {
        return ApiError::invalid("the query string is not valid: use period and tenant")
            .into_response();
    };
    let Some(period) = Period::of(filters.period.as_deref(), Utc::now().date_naive()) else {
        return ApiError::invalid("period: one of today, 7d, 30d, 90d, month").into_response();
    };
    let tenant = filters.tenant.filter(|t| !t.is_empty());
    if let Some(t) = &tenant
        && let Err(why) = super::keys::check_tenant(t)
    {
        return ApiError::invalid(why).into_response();
    }
    match queries::figures(&gw.pool, &period, tenant.as_deref()).await {
        Ok(figures) => html(
            StatusCode::OK,
            page::dashboard(&period, tenant.as_deref(), &figures),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "dashboard queries failed");
            ApiError::unavailable("the usage figures cannot be read right now (Postgres)")
                .into_response()
        }
    }
}

#[derive(Deserialize)]
struct LoginForm {
    key: String,
}

/// `POST /dashboard/login`: an admin key from the form becomes the login cookie.
async fn login(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    form: Result<axum::Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let key = form.ok().map(|f| f.0.key.trim().to_string());
    let key = key.filter(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_graphic()));
    if let Err(refused) = check_admin(&gw, key.as_deref(), peer).await {
        return refused;
    }
    let secure = forwarded_https(&headers);
    let cookie = format!(
        "{COOKIE}={}; Path=/dashboard; Max-Age={LOGIN_SECS}; HttpOnly; SameSite=Strict{}",
        key.unwrap_or_default(),
        if secure { "; Secure" } else { "" }
    );
    see_dashboard(&cookie)
}

/// `POST /dashboard/logout`: the cookie is cleared.
async fn logout(headers: HeaderMap) -> Response {
    let secure = forwarded_https(&headers);
    let cookie = format!(
        "{COOKIE}=; Path=/dashboard; Max-Age=0; HttpOnly; SameSite=Strict{}",
        if secure { "; Secure" } else { "" }
    );
    see_dashboard(&cookie)
}

/// Whether a proxy in front says the client used HTTPS (then the cookie is `Secure`).
fn forwarded_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

fn see_dashboard(cookie: &str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    let h = response.headers_mut();
    h.insert(header::LOCATION, HeaderValue::from_static("/dashboard"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(cookie) {
        h.insert(header::SET_COOKIE, v);
    }
    response
}

fn login_page(status: StatusCode, message: Option<&str>) -> Response {
    html(status, page::login(message))
}

/// An HTML answer that is never cached and runs only the gateway's own scripts.
fn html(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// The page's static files (no data in them: served without a key).
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_str!("assets/uPlot.min.css"),
    ),
    (
        "dashboard.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/dashboard.js"),
    ),
    (
        "dashboard.css",
        "text/css; charset=utf-8",
        include_str!("assets/dashboard.css"),
    ),
];

/// `GET /dashboard/assets/{name}`.
async fn asset(Path(name): Path<String>) -> Response {
    let Some((_, kind, body)) = ASSETS.iter().find(|(n, _, _)| *n == name) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    (
        [
            (header::CONTENT_TYPE, *kind),
            (header::CACHE_CONTROL, "public, max-age=300"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        *body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn periods_end_today_and_include_both_ends() {
        let today = day("2026-03-15");
        let p = |n: Option<&str>| Period::of(n, today).unwrap();
        assert_eq!(p(None).from, day("2026-02-14"));
        assert_eq!(p(Some("")).name, "30d");
        assert_eq!(p(Some("today")).from, today);
        assert_eq!(p(Some("7d")).from, day("2026-03-09"));
        assert_eq!(p(Some("90d")).from, day("2025-12-16"));
        assert_eq!(p(Some("month")).from, day("2026-03-01"));
        assert!(Period::of(Some("1y"), today).is_none());
    }

    #[test]
    fn the_key_comes_from_the_bearer_token_or_the_cookie() {
        let mut h = HeaderMap::new();
        assert_eq!(key_of(&h), None);
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; llmw_dashboard=llmw_x; b=2"),
        );
        assert_eq!(key_of(&h).as_deref(), Some("llmw_x"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer llmw_y"),
        );
        assert_eq!(key_of(&h).as_deref(), Some("llmw_y"));
    }
}
