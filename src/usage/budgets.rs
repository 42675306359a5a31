//! `llm_tenant_budgets`: the budgets of the configuration in force, so that SQL
//! (`llm_tenant_spend`) can put spend next to them.

use std::collections::BTreeMap;

use crate::config::TenantPolicy;

/// Replace the table's rows with the budgets of `tenants` (policies without one are left out).
pub(crate) async fn sync(
    pool: &sqlx::PgPool,
    tenants: &BTreeMap<String, TenantPolicy>,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("DELETE FROM llm_tenant_budgets")
        .execute(&mut *tx)
        .await?;
    for (tenant, p) in tenants.iter().filter(|(_, p)| p.has_budget()) {
        let tokens = |t: Option<u64>| t.map(|t| i64::try_from(t).unwrap_or(i64::MAX));
        sqlx::query(
            "INSERT INTO llm_tenant_budgets \
             (tenant, daily_usd, monthly_usd, daily_tokens, monthly_tokens) \
             VALUES ($1, $2::float8, $3::float8, $4, $5)",
        )
        .bind(tenant)
        .bind(p.daily_budget_usd)
        .bind(p.monthly_budget_usd)
        .bind(tokens(p.daily_budget_tokens))
        .bind(tokens(p.monthly_budget_tokens))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

/// [`sync`], logged (a failure leaves the table as it was; enforcement does not use it).
pub(crate) async fn sync_logged(pool: sqlx::PgPool, tenants: BTreeMap<String, TenantPolicy>) {
    if let Err(e) = sync(&pool, &tenants).await {
        tracing::warn!(error = %e, "cannot write llm_tenant_budgets");
    }
}
