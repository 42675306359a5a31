//! Tenant policies (`[tenants]`) through the contract: refused tenants and task types get
//! `invalid_job` naming why, reach no provider, and are counted per tenant in SQL.

use llm_worker_testkit::FakeLlmServer;
use serde_json::json;

use crate::helpers::{TestApp, collect_reply, openai_provider};

#[tokio::test]
async fn tenants_and_task_types_a_policy_refuses_never_reach_a_provider() {
    let fake = FakeLlmServer::start().await.unwrap();
    let toml = format!(
        "{}[routes]\ndefault = [\"openai\"]\nsummarize = [\"openai\"]\n\
         [tenants.acme]\ntask_types = [\"summarize\"]\n[tenants.blocked]\nrefuse = true\n",
        openai_provider("openai", &fake.base_url(), "gpt-test")
    );
    let mut app = TestApp::new(&toml).await;
    app.start_worker().await;
    let (reply_to, mut sub) = app.reply_inbox().await;
    let mut ask = async |tenant: &str, task: Option<&str>| {
        let mut job =
            json!({"prompt": "x", "tenant": tenant, "reply_to": reply_to, "stream": false});
        if let Some(t) = task {
            job["task_type"] = json!(t);
        }
        app.publish(job).await;
        collect_reply(&mut sub).await.result
    };
    let ok = ask("acme", Some("summarize")).await;
    assert_eq!(ok["status"], "ok", "{ok}");
    let wrong_task = ask("acme", None).await;
    assert_eq!(wrong_task["error"]["code"], "invalid_job");
    assert!(
        wrong_task["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with(r#"task_type: "default" is not allowed for tenant "acme""#),
        "{wrong_task}"
    );
    let blocked = ask("blocked", Some("summarize")).await;
    assert!(
        blocked["error"]["message"]
            .as_str()
            .unwrap()
            .contains("refused"),
        "{blocked}"
    );
    assert_eq!(ask("anyone", None).await["status"], "ok");
    assert_eq!(fake.request_count(), 2, "refused jobs reach no provider");
    app.wait_count(
        "SELECT coalesce(sum(jobs), 0)::bigint FROM llm_jobs_daily WHERE error_code = 'invalid_job' AND tenant IN ('acme', 'blocked')",
        2,
    )
    .await;
    app.teardown().await;
}
