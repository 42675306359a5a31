//! The dashboard's HTML: the login form, and the page of figures (tables rendered here, the
//! chart series as JSON for `assets/dashboard.js`). Every value is HTML-escaped; the JSON
//! block has `<` escaped so no value can end it.

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::{Figures, PERIODS, Period};

/// `s` safe in HTML text and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A value as the page shows it: numbers as Postgres gave them, `-` for none.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::String(s) => esc(s),
        Value::Bool(b) => b.to_string(),
        other => esc(&other.to_string()),
    }
}

fn head(title: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{}</title>
<link rel="stylesheet" href="/dashboard/assets/uPlot.min.css">
<link rel="stylesheet" href="/dashboard/assets/dashboard.css">
</head>
"#,
        esc(title)
    )
}

/// The login form, with why the last key was refused.
pub(crate) fn login(message: Option<&str>) -> String {
    let mut out = head("llm-worker usage: log in");
    out.push_str(
        r#"<body class="login">
<main>
<h1>llm-worker usage</h1>
<form method="post" action="/dashboard/login" id="login">
<label for="key">Admin API key</label>
<input id="key" name="key" type="password" autocomplete="current-password" required>
<button type="submit">Log in</button>
</form>
"#,
    );
    if let Some(m) = message {
        let _ = writeln!(out, r#"<p class="error" id="login-error">{}</p>"#, esc(m));
    }
    out.push_str(
        "<p class=\"hint\">Create one with <code>llm-worker keys create --admin &lt;name&gt;</code>.</p>\n</main>\n</body>\n</html>\n",
    );
    out
}

/// A table of `rows`: one `<tr data-key>` per row (the `key` columns joined by `/`), one
/// `<td data-col>` per column.
fn table(out: &mut String, id: &str, rows: &[Value], key: &[&str], columns: &[(&str, &str)]) {
    let _ = write!(out, r#"<table id="{id}"><thead><tr>"#);
    for (col, label) in columns {
        // A column of numbers is right-aligned, its heading too.
        let numeric = rows
            .iter()
            .filter_map(|r| r.get(*col))
            .any(Value::is_number);
        let class = if numeric { " class=\"num\"" } else { "" };
        let _ = write!(out, r#"<th data-col="{col}"{class}>{}</th>"#, esc(label));
    }
    out.push_str("</tr></thead><tbody>");
    if rows.is_empty() {
        let _ = write!(
            out,
            r#"<tr class="empty"><td colspan="{}">Nothing in this period.</td></tr>"#,
            columns.len()
        );
    }
    for row in rows {
        let row_key: Vec<String> = key
            .iter()
            .map(|k| row.get(*k).map_or_else(String::new, plain))
            .collect();
        let _ = write!(out, r#"<tr data-key="{}">"#, esc(&row_key.join("/")));
        for (col, _) in columns {
            let v = row.get(*col).unwrap_or(&Value::Null);
            let class = if v.is_number() { " class=\"num\"" } else { "" };
            let _ = write!(out, r#"<td data-col="{col}"{class}>{}</td>"#, text(v));
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>\n");
}

/// A value as plain text (unescaped).
fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A chart: lines of `value` from the rows of each figure named in `spec`.
fn chart(out: &mut String, id: &str, title: &str, spec: &Value) {
    let _ = writeln!(
        out,
        r#"<section class="panel"><h2>{}</h2><div class="chart" id="{id}" data-spec="{}"></div></section>"#,
        esc(title),
        esc(&spec.to_string())
    );
}

fn card(out: &mut String, id: &str, label: &str, value: &str) {
    let _ = write!(
        out,
        r#"<div class="card"><span class="label">{}</span><span class="value" id="{id}">{value}</span></div>"#,
        esc(label)
    );
}

/// The page of figures for `period` and `tenant`.
pub(crate) fn dashboard(period: &Period, tenant: Option<&str>, f: &Figures) -> String {
    let mut out = head("llm-worker usage");
    out.push_str("<body>\n<header>\n<h1>llm-worker usage</h1>\n");
    filters(&mut out, period, tenant, &f.tenants);
    out.push_str(
        "<form method=\"post\" action=\"/dashboard/logout\" id=\"logout\"><button type=\"submit\">Log out</button></form>\n</header>\n<main>\n",
    );
    let _ = writeln!(
        out,
        r#"<p class="scope" id="scope">{} to {} (UTC days) · {}</p>"#,
        period.from,
        period.to,
        tenant.map_or_else(
            || "every tenant".to_string(),
            |t| format!("tenant {}", esc(t))
        )
    );

    let totals = f.one("totals");
    let jobs = f.one("jobs");
    let sum = |name: &str, col: &str| -> f64 {
        f.rows(name)
            .iter()
            .filter_map(|r| r.get(col)?.as_f64())
            .sum()
    };
    let saved = sum("response_cache_daily", "cost_saved_usd")
        + sum("prompt_cache_daily", "cache_saved_usd");
    let get = |row: &Value, col: &str| text(row.get(col).unwrap_or(&Value::Null));
    out.push_str("<section class=\"cards\">");
    card(
        &mut out,
        "total-cost_usd",
        "Spend (USD)",
        &get(totals, "cost_usd"),
    );
    card(&mut out, "total-jobs", "Jobs", &get(jobs, "jobs"));
    card(&mut out, "total-calls", "Calls", &get(totals, "calls"));
    card(
        &mut out,
        "total-failure_rate",
        "Failed calls (share)",
        &get(totals, "failure_rate"),
    );
    card(
        &mut out,
        "total-tokens",
        "Tokens in / out",
        &format!(
            "{} / {}",
            get(totals, "input_tokens"),
            get(totals, "output_tokens")
        ),
    );
    card(
        &mut out,
        "total-cache_saved_usd",
        "Cache savings (USD)",
        &format!("{saved:.4}"),
    );
    out.push_str("</section>\n<div class=\"grid\">\n");

    let by = |figure: &str, value: &str| json!([{"figure": figure, "value": value, "zero": true}]);
    chart(
        &mut out,
        "chart-spend-tenant",
        "Spend per day by tenant (USD)",
        &by("spend_by_tenant_daily", "cost_usd"),
    );
    chart(
        &mut out,
        "chart-spend-model",
        "Spend per day by model (USD)",
        &by("spend_by_model_daily", "cost_usd"),
    );
    chart(
        &mut out,
        "chart-tokens-tenant",
        "Tokens per day by tenant",
        &by("spend_by_tenant_daily", "tokens"),
    );
    chart(
        &mut out,
        "chart-tokens-model",
        "Tokens per day by model",
        &by("spend_by_model_daily", "tokens"),
    );
    chart(
        &mut out,
        "chart-failures",
        "Failed calls per day by provider (share)",
        &json!([{"figure": "providers_daily", "value": "failure_rate"}]),
    );
    chart(
        &mut out,
        "chart-latency",
        "p95 latency per day by provider (ms)",
        &json!([{"figure": "providers_daily", "value": "latency_ms_p95"}]),
    );
    chart(
        &mut out,
        "chart-cache",
        "Cache savings per day (USD)",
        &json!([
            {"figure": "response_cache_daily", "value": "cost_saved_usd",
             "label": "response cache", "zero": true},
            {"figure": "prompt_cache_daily", "value": "cache_saved_usd",
             "label": "provider prompt cache", "zero": true}
        ]),
    );
    out.push_str("</div>\n");

    let money_and_tokens = [
        ("calls", "Calls"),
        ("failed_calls", "Failed"),
        ("input_tokens", "Input tokens"),
        ("output_tokens", "Output tokens"),
        ("cost_usd", "Cost (USD)"),
    ];
    out.push_str("<section class=\"panel\"><h2>By tenant</h2>");
    let mut columns = vec![("tenant", "Tenant")];
    columns.extend(money_and_tokens);
    table(
        &mut out,
        "by-tenant",
        f.rows("by_tenant"),
        &["tenant"],
        &columns,
    );
    out.push_str("</section>\n<section class=\"panel\"><h2>By model</h2>");
    let mut columns = vec![("provider", "Provider"), ("model", "Model")];
    columns.extend(money_and_tokens);
    table(
        &mut out,
        "by-model",
        f.rows("by_model"),
        &["provider", "model"],
        &columns,
    );
    out.push_str("</section>\n<section class=\"panel\"><h2>Providers</h2>");
    table(
        &mut out,
        "providers",
        f.rows("providers"),
        &["provider"],
        &[
            ("provider", "Provider"),
            ("calls", "Calls"),
            ("failed_calls", "Failed"),
            ("failure_rate", "Failed (share)"),
            ("latency_ms_avg", "Mean ms"),
            ("latency_ms_p50", "p50 ms"),
            ("latency_ms_p95", "p95 ms"),
            ("latency_ms_p99", "p99 ms"),
        ],
    );
    out.push_str("</section>\n<section class=\"panel\"><h2>Budgets (today and this month)</h2>");
    table(
        &mut out,
        "budgets",
        f.rows("budgets"),
        &["tenant"],
        &[
            ("tenant", "Tenant"),
            ("day_usd", "Today (USD)"),
            ("daily_usd", "Daily budget"),
            ("day_usd_pct", "Used %"),
            ("month_usd", "This month (USD)"),
            ("monthly_usd", "Monthly budget"),
            ("month_usd_pct", "Used %"),
            ("month_tokens", "Tokens this month"),
            ("monthly_tokens", "Monthly tokens"),
            ("month_tokens_pct", "Used %"),
        ],
    );
    out.push_str("</section>\n");
    top_jobs(&mut out, f);
    let _ = write!(
        out,
        "</main>\n<script type=\"application/json\" id=\"figures\">{}</script>\n\
         <script src=\"/dashboard/assets/uPlot.iife.min.js\"></script>\n\
         <script src=\"/dashboard/assets/dashboard.js\"></script>\n</body>\n</html>\n",
        series_json(f)
    );
    out
}

fn filters(out: &mut String, period: &Period, tenant: Option<&str>, tenants: &[String]) {
    out.push_str(
        r#"<form method="get" action="/dashboard" id="filters"><label>Period <select name="period" id="period">"#,
    );
    for (value, label) in PERIODS {
        let selected = if *value == period.name {
            " selected"
        } else {
            ""
        };
        let _ = write!(out, r#"<option value="{value}"{selected}>{label}</option>"#);
    }
    out.push_str(
        r#"</select></label> <label>Tenant <select name="tenant" id="tenant"><option value="">Every tenant</option>"#,
    );
    let mut names: Vec<&str> = tenants.iter().map(String::as_str).collect();
    if let Some(t) = tenant
        && !names.contains(&t)
    {
        names.push(t);
    }
    for name in names {
        let selected = if Some(name) == tenant {
            " selected"
        } else {
            ""
        };
        let _ = write!(
            out,
            r#"<option value="{0}"{selected}>{0}</option>"#,
            esc(name)
        );
    }
    out.push_str("</select></label> <button type=\"submit\" id=\"apply\">Apply</button></form>\n");
}

/// The most expensive jobs, each with its calls.
fn top_jobs(out: &mut String, f: &Figures) {
    out.push_str(
        "<section class=\"panel\"><h2>Most expensive jobs</h2><table id=\"top-jobs\"><thead><tr>\
         <th>Job</th><th>Tenant</th><th>Kind</th><th>Status</th><th>Model</th><th>Attempts</th>\
         <th>Tokens in / out</th><th>Cost (USD)</th><th>Finished</th></tr></thead>",
    );
    let jobs = f.rows("top_jobs");
    if jobs.is_empty() {
        out.push_str(
            "<tbody><tr class=\"empty\"><td colspan=\"9\">Nothing in this period.</td></tr></tbody>",
        );
    }
    let get = |row: &Value, col: &str| text(row.get(col).unwrap_or(&Value::Null));
    for job in jobs {
        let id = job.get("job_id").map_or_else(String::new, plain);
        let _ = write!(
            out,
            "<tbody class=\"job\" data-key=\"{}\"><tr><td class=\"id\">{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}/{}</td><td class=\"num\">{}</td><td class=\"num\">{} / {}</td>\
             <td class=\"num\" data-col=\"cost_usd\">{}</td><td>{}</td></tr>",
            esc(&id),
            esc(&id),
            get(job, "tenant"),
            get(job, "kind"),
            get(job, "status"),
            get(job, "provider"),
            get(job, "model"),
            get(job, "attempts"),
            get(job, "input_tokens"),
            get(job, "output_tokens"),
            get(job, "cost_usd"),
            get(job, "finished_at"),
        );
        let calls: Vec<Value> = f
            .rows("top_job_calls")
            .iter()
            .filter(|c| c.get("job_id").map(plain).as_deref() == Some(id.as_str()))
            .cloned()
            .collect();
        out.push_str("<tr class=\"calls\"><td colspan=\"9\">");
        table(
            out,
            &format!("calls-{}", esc(&id)),
            &calls,
            &["attempt"],
            &[
                ("attempt", "Attempt"),
                ("provider", "Provider"),
                ("model", "Model"),
                ("status", "Status"),
                ("error_code", "Error"),
                ("input_tokens", "In"),
                ("output_tokens", "Out"),
                ("cost_usd", "Cost (USD)"),
                ("latency_ms", "ms"),
            ],
        );
        out.push_str("</td></tr></tbody>");
    }
    out.push_str("</table></section>\n");
}

/// The rows the charts draw, as JSON safe inside a `<script>` element.
fn series_json(f: &Figures) -> String {
    let names = [
        "spend_by_tenant_daily",
        "spend_by_model_daily",
        "providers_daily",
        "response_cache_daily",
        "prompt_cache_daily",
    ];
    let series: serde_json::Map<String, Value> = names
        .iter()
        .map(|n| (n.to_string(), Value::from(f.rows(n).to_vec())))
        .collect();
    Value::Object(series).to_string().replace('<', "\\u003c")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_cannot_break_out_of_the_page() {
        let mut f = Figures::default();
        let evil = "</script><script>alert(1)</script>";
        f.rows.insert(
            "spend_by_tenant_daily",
            vec![json!({"day": "2026-01-01", "series": evil, "cost_usd": 1})],
        );
        f.rows
            .insert("by_tenant", vec![json!({"tenant": evil, "cost_usd": 1.5})]);
        f.tenants = vec![evil.to_string()];
        let period = Period::of(None, "2026-01-02".parse().unwrap()).unwrap();
        let page = dashboard(&period, None, &f);
        assert_eq!(page.matches("<script").count(), 3, "{page}");
        assert!(page.contains("&lt;/script&gt;"));
        assert!(page.contains(r#"<td data-col="cost_usd" class="num">1.5</td>"#));
    }
}
