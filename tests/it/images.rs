//! Image jobs (CONTRACT.md section 8) through NATS: the fallback after a content-policy
//! refusal, pictures in the object store matching the fake's bytes, the result and the
//! ledger's picture counts and costs (per picture, or in tokens); a job whose pictures were
//! stored by a worker that died before storing the result is answered from them.

use futures::StreamExt;
use llm_worker_testkit::{
    FAKE_IMAGE_OUTPUT_TOKENS, FAKE_PICTURE_SIDE, FakeLlmServer, Reply, fake_png,
};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use uuid::Uuid;

use crate::helpers::{TestApp, collect_reply};

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn provider(name: &str, kind: &str, base: &str) -> String {
    format!(
        "[providers.{name}]\ntype = \"{kind}\"\nbase_url = \"{base}\"\ndefault_model = \"chat\"\n\
         max_retries = 1\nretry_min_delay_ms = 10\nretry_max_delay_ms = 50\n"
    )
}

/// The bytes of an object in the app's picture bucket.
async fn object(app: &TestApp, name: &str) -> Vec<u8> {
    let store = app
        .js
        .get_object_store(&app.config.nats.images_bucket)
        .await
        .unwrap();
    let mut object = store.get(name).await.unwrap();
    let mut bytes = Vec::new();
    object.read_to_end(&mut bytes).await.unwrap();
    bytes
}

async fn price(
    app: &TestApp,
    provider: &str,
    model: &str,
    tokens: (f64, f64),
    per_image: Option<Value>,
) {
    llm_worker::usage::migrate(&app.db).await.unwrap();
    sqlx::query(
        "INSERT INTO llm_prices (provider, model, effective_from, input_usd_per_mtok,
             output_usd_per_mtok, per_image_usd)
         VALUES ($1, $2, '2020-01-01', $3, $4, $5)",
    )
    .bind(provider)
    .bind(model)
    .bind(tokens.0)
    .bind(tokens.1)
    .bind(per_image)
    .execute(&app.db)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_refused_picture_falls_back_and_lands_in_the_bucket_with_its_calls_priced() {
    let (strict, lenient) = (
        FakeLlmServer::start().await.unwrap(),
        FakeLlmServer::start().await.unwrap(),
    );
    strict.push(Reply::content_policy());
    let toml = format!(
        "{}{}\n[routes]\ndefault = [\"strict\"]\n[image_routes]\ndefault = [\"strict:gpt-image-1\", \"lenient:dall-e-3\"]\n",
        provider("strict", "openai", &strict.base_url()),
        provider("lenient", "openai", &lenient.base_url()),
    );
    let mut app = TestApp::new(&toml).await;
    price(&app, "strict", "gpt-image-1", (5.0, 40.0), None).await;
    // A key that is not a number is passed over, in SQL and in the worker.
    let per_image = json!({"1024x1024/standard": 0.04, "1024x1024": "n/a", "*": 0.12});
    price(&app, "lenient", "dall-e-3", (0.0, 0.0), Some(per_image)).await;
    app.start_worker().await;

    let (reply_to, mut sub) = app.reply_inbox().await;
    let prompt = "a red fox in the snow";
    let job_id = app
        .publish_to(
            "image",
            json!({"prompt": prompt, "reply_to": reply_to, "tenant": "acme",
                   "options": {"size": "1024x1024", "quality": "standard"}}),
        )
        .await;
    let reply = collect_reply(&mut sub).await;
    let r = &reply.result;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["provider"], "lenient");
    assert_eq!(r["model_used"], "dall-e-3");
    assert_eq!(r["attempt"], 2);
    assert_eq!(r["attempts"][0]["error"]["code"], "content_filtered");
    assert!(reply.chunks.is_empty(), "image jobs send no chunks");
    let images = r["images"].as_array().unwrap();
    assert_eq!(images.len(), 1);
    let image = &images[0];
    let expected = fake_png(prompt, 0);
    assert_eq!(image["object"], format!("{job_id}/0.png"));
    assert_eq!(image["bucket"], app.config.nats.images_bucket.as_str());
    assert_eq!(image["sha256"], sha256_hex(&expected));
    assert_eq!(image["bytes"], expected.len());
    assert_eq!(image["media_type"], "image/png");
    assert_eq!(image["width"], FAKE_PICTURE_SIDE);
    assert_eq!(image["height"], FAKE_PICTURE_SIDE);
    assert_eq!(image["revised_prompt"], format!("{prompt}, in detail"));
    assert_eq!(object(&app, &format!("{job_id}/0.png")).await, expected);
    // DALL-E is asked for base64; the refusing entry got the job's options.
    assert_eq!(lenient.requests()[0]["response_format"], "b64_json");
    assert_eq!(strict.requests()[0]["prompt"], prompt);
    assert!((r["cost_usd"].as_f64().unwrap() - 0.04).abs() < 1e-9, "{r}");

    // The stored result is the one sent live; the ledger has the job and both calls.
    assert_eq!(app.wait_stored_result(job_id).await["images"], r["images"]);
    let id = job_id.to_string();
    app.wait_count(
        &format!("SELECT count(*) FROM llm_jobs WHERE job_id = '{id}'"),
        1,
    )
    .await;
    let (kind, images, cost): (String, i32, Option<f64>) =
        sqlx::query_as("SELECT kind, images, cost_usd::float8 FROM llm_jobs WHERE job_id = $1")
            .bind(job_id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!((kind.as_str(), images), ("image", 1));
    assert!((cost.unwrap() - 0.04).abs() < 1e-9);
    let calls: Vec<(
        i32,
        String,
        i32,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<f64>,
    )> = sqlx::query_as(
        "SELECT attempt, status, images, image_size, image_quality, error_code,
                    cost_usd::float8
             FROM llm_calls WHERE job_id = $1 ORDER BY attempt",
    )
    .bind(job_id)
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0].1, "error");
    assert_eq!(calls[0].2, 0);
    assert_eq!(calls[0].5.as_deref(), Some("content_filtered"));
    assert_eq!(
        calls[0].6,
        Some(0.0),
        "a refusal without tokens costs nothing"
    );
    assert_eq!(calls[1].1, "ok");
    assert_eq!(calls[1].2, 1);
    assert_eq!(calls[1].3.as_deref(), Some("1024x1024"));
    assert_eq!(calls[1].4.as_deref(), Some("standard"));
    assert!((calls[1].6.unwrap() - 0.04).abs() < 1e-9, "{calls:?}");
    app.teardown().await;
}

#[tokio::test]
async fn pictures_billed_in_tokens_cost_their_tokens_on_openai_and_gemini() {
    let fake = FakeLlmServer::start().await.unwrap();
    for (kind, base, model, output) in [
        (
            "openai",
            fake.base_url(),
            "gpt-image-2",
            FAKE_IMAGE_OUTPUT_TOKENS * 2,
        ),
        (
            "gemini",
            fake.root_url(),
            "gemini-2.5-flash-image",
            1290 * 2,
        ),
    ] {
        let toml = format!(
            "{}\n[routes]\ndefault = [\"p\"]\n",
            provider("p", kind, &base)
        );
        let mut app = TestApp::new(&toml).await;
        price(&app, "p", model, (5.0, 40.0), Some(json!({"*": 99.0}))).await;
        app.start_worker().await;
        let (reply_to, mut sub) = app.reply_inbox().await;
        let prompt = format!("two {kind} owls");
        let job_id = app
            .publish_to(
                "image",
                json!({"prompt": prompt, "reply_to": reply_to, "options": {"n": 2}}),
            )
            .await;
        let r = collect_reply(&mut sub).await.result;
        assert_eq!(r["status"], "ok", "{kind}: {r}");
        assert_eq!(
            r["model_used"], model,
            "no model named: the protocol's image model"
        );
        let images = r["images"].as_array().unwrap();
        assert_eq!(images.len(), 2, "{kind}");
        for (i, image) in images.iter().enumerate() {
            let expected = fake_png(&prompt, i);
            assert_eq!(image["sha256"], sha256_hex(&expected), "{kind} {i}");
            let name = image["object"].as_str().unwrap();
            assert_eq!(name, format!("{job_id}/{i}.png"));
            assert_eq!(object(&app, name).await, expected, "{kind} {i}");
        }
        let input = (prompt.chars().count() as u64).div_ceil(4);
        assert_eq!(r["tokens_used"]["output"], output, "{kind}");
        let cost = (input as f64 * 5.0 + output as f64 * 40.0) / 1e6;
        assert!(
            (r["cost_usd"].as_f64().unwrap() - cost).abs() < 1e-9,
            "{kind}: {r}"
        );
        let id = job_id.to_string();
        app.wait_count(
            &format!("SELECT count(*) FROM llm_calls WHERE job_id = '{id}' AND images = 2"),
            1,
        )
        .await;
        let (recorded,): (f64,) =
            sqlx::query_as("SELECT cost_usd::float8 FROM llm_jobs WHERE job_id = $1")
                .bind(job_id)
                .fetch_one(&app.db)
                .await
                .unwrap();
        assert!(
            (recorded - cost).abs() < 1e-9,
            "{kind}: tokens, not the per-image price"
        );
        app.teardown().await;
    }
}

#[tokio::test]
async fn pictures_stored_before_a_worker_died_answer_the_redelivered_job_without_a_call() {
    let fake = FakeLlmServer::start().await.unwrap();
    let toml = format!(
        "{}\n[routes]\ndefault = [\"p\"]\n",
        provider("p", "openai", &fake.base_url())
    );
    let app = TestApp::new(&toml).await;
    let worker = app.spawn_process("", &["run"]).await;
    // Results cannot be stored for now: the worker puts the picture, then fails to store the
    // result (as if it died in between).
    let mut results = app
        .js
        .get_stream(&app.config.nats.results_stream)
        .await
        .unwrap();
    let mut config = results.info().await.unwrap().config.clone();
    let open = config.max_message_size;
    config.max_message_size = 16;
    app.js.update_stream(&config).await.unwrap();
    let store = app
        .js
        .get_object_store(&app.config.nats.images_bucket)
        .await
        .unwrap();
    let mut watch = store.watch().await.unwrap();

    let job_id = Uuid::now_v7();
    let (reply_to, mut sub) = app.reply_inbox().await;
    let prompt = "a lighthouse at dusk";
    app.publish_to(
        "image",
        json!({"job_id": job_id, "prompt": prompt, "reply_to": reply_to}),
    )
    .await;
    let put = tokio::time::timeout(std::time::Duration::from_secs(20), watch.next())
        .await
        .expect("no picture was put")
        .unwrap()
        .unwrap();
    assert_eq!(put.name, format!("{job_id}/0.png"));
    // Killed after the picture was put; the result is not stored.
    worker.kill().await;
    assert!(app.stored_result(job_id).await.is_none());
    assert_eq!(fake.request_count(), 1);

    config.max_message_size = open;
    app.js.update_stream(&config).await.unwrap();
    let _second = app.spawn_process("", &["run"]).await;
    let r = collect_reply(&mut sub).await.result;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["images"][0]["sha256"], sha256_hex(&fake_png(prompt, 0)));
    assert_eq!(
        fake.request_count(),
        1,
        "the redelivered job called no provider"
    );
    assert_eq!(app.wait_stored_result(job_id).await["images"], r["images"]);
    let id = job_id.to_string();
    app.wait_count(
        &format!("SELECT count(*) FROM llm_calls WHERE job_id = '{id}'"),
        1,
    )
    .await;
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM llm_jobs WHERE job_id = '{id}' AND images = 1"
        ))
        .await,
        1
    );
    app.teardown().await;
}

#[tokio::test]
async fn submit_image_gen_writes_the_picture_file() {
    let fake = FakeLlmServer::start().await.unwrap();
    let toml = format!(
        "{}\n[routes]\ndefault = [\"p\"]\n",
        provider("p", "openai", &fake.base_url())
    );
    let mut app = TestApp::new(&toml).await;
    app.start_worker().await;
    let dir = std::env::temp_dir().join(format!("llmw-image-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.toml");
    std::fs::write(&config, &app.toml).unwrap();
    let out = dir.join("fox.png");
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-worker"))
        .arg("--config")
        .arg(&config)
        .args([
            "submit",
            "--image-gen",
            "a red fox",
            "--size",
            "1024x1024",
            "-o",
        ])
        .arg(&out)
        .env_remove("DATABASE_URL")
        .env_remove("NATS_URL")
        .env_remove("LLM_WORKER_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .unwrap();
    assert!(status.success());
    assert_eq!(std::fs::read(&out).unwrap(), fake_png("a red fox", 0));
    assert_eq!(fake.requests()[0]["size"], "1024x1024");
    let _ = std::fs::remove_dir_all(dir);
    app.teardown().await;
}

#[tokio::test]
async fn an_openai_client_gets_pictures_as_base64_and_as_urls_only_its_tenant_can_read() {
    use async_openai::types::images::{CreateImageRequestArgs, Image, ImageResponseFormat};
    use base64::Engine as _;
    let s = crate::gateway::Setup::new("", |_| {}).await;
    let client = async_openai::Client::with_config(
        async_openai::config::OpenAIConfig::new()
            .with_api_base(s.url("/v1"))
            .with_api_key(&s.key),
    );
    let prompt = "a fox reading a map";
    let b64 = client
        .images()
        .generate(
            CreateImageRequestArgs::default()
                .prompt(prompt)
                .n(2u8)
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(b64.data.len(), 2);
    for (i, image) in b64.data.iter().enumerate() {
        let Image::B64Json { b64_json, .. } = image.as_ref() else {
            panic!("not base64: {image:?}")
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64_json.as_str())
            .unwrap();
        assert_eq!(bytes, fake_png(prompt, i));
    }
    assert_eq!(
        b64.usage.map(|u| u.output_tokens),
        Some(2 * FAKE_IMAGE_OUTPUT_TOKENS as u32)
    );
    // The default model is the route's: gpt-image-2 on the OpenAI provider.
    assert_eq!(s.fake.requests()[0]["model"], "gpt-image-2");

    #[allow(deprecated)]
    let by_url = client
        .images()
        .generate(
            CreateImageRequestArgs::default()
                .prompt(prompt)
                .response_format(ImageResponseFormat::Url)
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    let Image::Url { url, .. } = by_url.data[0].as_ref() else {
        panic!("not a URL: {:?}", by_url.data[0])
    };
    assert!(url.starts_with(&s.url("/v1/images/")), "{url}");
    let get = |key: String| {
        let url = url.clone();
        async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
        }
    };
    let mine = get(s.key.clone()).await;
    assert_eq!(mine.status(), 200);
    assert_eq!(mine.headers()["content-type"], "image/png");
    assert_eq!(mine.bytes().await.unwrap().to_vec(), fake_png(prompt, 0));
    let other = get(s.key_of("globex", false).await).await;
    assert_eq!(
        other.status(),
        404,
        "another tenant's key cannot read the picture"
    );
    let nobody = reqwest::Client::new()
        .get(url.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(nobody.status(), 401);

    // The seed API: the contract's job in, its result out.
    let (status, _, result) = s
        .post(
            "/v1/image/generate",
            None,
            json!({"prompt": "a kite"}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{result}");
    assert_eq!(result["tenant"], "acme");
    assert_eq!(
        result["images"][0]["sha256"],
        sha256_hex(&fake_png("a kite", 0))
    );
    s.teardown().await;
}
