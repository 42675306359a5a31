//! `llm-worker usage`: the daily usage table, read from the `llm_usage_daily` view with the
//! same SQL a user would write.

use chrono::NaiveDate;

/// One row of the report.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DailyRow {
    pub day: NaiveDate,
    pub tenant: String,
    pub provider: String,
    pub model: String,
    pub jobs: i64,
    pub calls: i64,
    pub failed_calls: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_usd: Option<f64>,
    pub unpriced_calls: i64,
}

/// Usage per day, tenant, provider and model for `from <= day < to` (UTC days).
pub async fn daily(
    pool: &sqlx::PgPool,
    from: NaiveDate,
    to: NaiveDate,
    tenant: Option<&str>,
) -> Result<Vec<DailyRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT day, tenant, provider, model, jobs, calls, failed_calls, input_tokens, \
                output_tokens, cost_usd::float8 AS cost_usd, unpriced_calls \
         FROM llm_usage_daily \
         WHERE day >= $1 AND day < $2 AND ($3::text IS NULL OR tenant = $3) \
         ORDER BY day, tenant, provider, model",
    )
    .bind(from)
    .bind(to)
    .bind(tenant)
    .fetch_all(pool)
    .await
}

/// Render the last `limit` rows (the newest days; every row with `None`) as an aligned text
/// table, with a total line over all `rows` and a note of how many were left out.
pub fn render_last(rows: &[DailyRow], limit: Option<usize>) -> String {
    let skip = limit.map_or(0, |n| rows.len().saturating_sub(n));
    let mut out = String::new();
    if skip > 0 {
        out.push_str(&format!(
            "({skip} earlier row(s) not shown: --limit N shows more, --limit 0 all; the total counts them)\n"
        ));
    }
    let table = render(rows);
    let mut lines = table.lines();
    if let Some(header) = lines.next() {
        out.push_str(header);
        out.push('\n');
    }
    for line in lines.skip(skip) {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Render rows as an aligned text table with a total line.
pub fn render(rows: &[DailyRow]) -> String {
    let header = [
        "day",
        "tenant",
        "provider",
        "model",
        "jobs",
        "calls",
        "failed",
        "input_tok",
        "output_tok",
        "cost_usd",
    ];
    let cost = |c: Option<f64>, unpriced: i64| match c {
        Some(c) if unpriced == 0 => format!("{c:.6}"),
        Some(c) => format!("{c:.6}+?"),
        None => "?".to_string(),
    };
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for r in rows {
        table.push(vec![
            r.day.to_string(),
            r.tenant.clone(),
            r.provider.clone(),
            r.model.clone(),
            r.jobs.to_string(),
            r.calls.to_string(),
            r.failed_calls.to_string(),
            r.input_tokens.to_string(),
            r.output_tokens.to_string(),
            cost(r.cost_usd, r.unpriced_calls),
        ]);
    }
    // fold from +0.0: `sum()` of no floats is -0.0, which prints as "-0.000000".
    let total_cost = rows
        .iter()
        .filter_map(|r| r.cost_usd)
        .fold(0.0, |a, b| a + b);
    let unpriced: i64 = rows.iter().map(|r| r.unpriced_calls).sum();
    table.push(vec![
        "total".into(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        rows.iter().map(|r| r.calls).sum::<i64>().to_string(),
        rows.iter().map(|r| r.failed_calls).sum::<i64>().to_string(),
        rows.iter().map(|r| r.input_tokens).sum::<i64>().to_string(),
        rows.iter()
            .map(|r| r.output_tokens)
            .sum::<i64>()
            .to_string(),
        cost(Some(total_cost), unpriced),
    ]);
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            table
                .iter()
                .map(|row| row[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &table {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (cell, w))| {
                if i >= 4 {
                    format!("{cell:>w$}")
                } else {
                    format!("{cell:<w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    if unpriced > 0 {
        out.push_str(&format!(
            "({unpriced} call(s) have no price in llm_prices: '+?' marks costs that are lower bounds)\n"
        ));
    }
    out
}
