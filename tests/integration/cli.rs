//! The operator CLI: `sessiond env create | list | rotate-key | bootstrap-dev`.

use crate::common;

use std::process::Command;

use sessiond::config::Config;
use sessiond::tenancy::keys::MasterKey;
use sessiond::tenancy::store as tenancy;

fn sessiond(schema: &str, master: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sessiond"))
        .args(args)
        .env("DATABASE_URL", common::database_url())
        .env("DATABASE_SCHEMA", schema)
        .env("SESSIOND_MASTER_KEY", master)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run sessiond");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// The first JSON document in a command's output (a `--json` run prints one
/// on stdout; anything logged to stderr follows it).
fn json_in(output: &str) -> serde_json::Value {
    let start = output.find(['{', '[']).unwrap_or_else(|| panic!("no JSON in {output}"));
    serde_json::Deserializer::from_str(&output[start..])
        .into_iter::<serde_json::Value>()
        .next()
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("no JSON document in {output}"))
}

fn key_in(output: &str, prefix: &str) -> String {
    output
        .split_whitespace()
        .find(|w| w.starts_with(prefix))
        .unwrap_or_else(|| panic!("no key in {output}"))
        .to_string()
}

#[tokio::test]
async fn env_create_list_rotate_and_bootstrap() {
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let master_hex = "11".repeat(32);
    let master = MasterKey::from_hex(&master_hex).unwrap();
    let pool =
        sessiond::db::connect(&Config::for_database(&common::database_url(), Some(schema.clone()))).await.unwrap();

    let (ok, out) =
        sessiond(&schema, &master_hex, &["env", "create", "--org", "acme", "--project", "chat", "--type", "staging"]);
    assert!(ok, "{out}");
    let key = key_in(&out, "tr_stg_");
    let env = tenancy::find_by_key(&pool, &master, &key).await.unwrap().expect("key authenticates");

    // The key is stored hashed and sealed, never in clear.
    let stored: Vec<(Vec<u8>, Vec<u8>)> =
        sqlx::query_as("SELECT api_key_hash, api_key_sealed FROM runtime_environments").fetch_all(&pool).await.unwrap();
    for (hash, sealed) in stored {
        for col in [hash, sealed] {
            assert!(!col.windows(key.len()).any(|w| w == key.as_bytes()));
        }
    }

    let (ok, out) = sessiond(&schema, &master_hex, &["env", "list"]);
    assert!(ok && out.contains(&env.id.to_string()) && out.contains("acme") && out.contains("staging"), "{out}");
    assert!(!out.contains(&key), "list must not print keys");

    // --json: one document, the same facts, still no key.
    let (ok, out) = sessiond(&schema, &master_hex, &["env", "list", "--json"]);
    assert!(ok, "{out}");
    let listed = json_in(&out);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["id"], env.id.to_string());
    assert_eq!((listed[0]["organization"].as_str(), listed[0]["type"].as_str()), (Some("acme"), Some("staging")));
    assert!(!out.contains(&key), "list --json must not print keys");

    let (ok, out) = sessiond(&schema, &master_hex, &["env", "rotate-key", &env.id.to_string()]);
    assert!(ok, "{out}");
    let new_key = key_in(&out, "tr_stg_");
    let (ok, out) = sessiond(&schema, &master_hex, &["env", "rotate-key", &env.id.to_string(), "--json"]);
    assert!(ok, "{out}");
    let rotated = json_in(&out);
    assert_eq!(rotated["id"], env.id.to_string());
    let new_key_json = rotated["secretKey"].as_str().expect("the new key").to_string();
    assert!(tenancy::find_by_key(&pool, &master, &new_key).await.unwrap().is_none(), "rotated again");
    let new_key = new_key_json;
    // Each rotation is audited as the command line's, like the dashboard's as its operator's.
    let audited: Vec<(String, String, String)> =
        sqlx::query_as("SELECT action, target, actor_kind FROM audit_log ORDER BY created_at")
            .fetch_all(&pool)
            .await
            .unwrap();
    let rotation = ("environment.rotate_key".to_string(), format!("environment:{}", env.id), "cli".to_string());
    assert_eq!(audited, vec![rotation.clone(), rotation], "two rotations, two rows");
    assert_ne!(new_key, key);
    assert!(tenancy::find_by_key(&pool, &master, &key).await.unwrap().is_none());
    assert_eq!(tenancy::find_by_key(&pool, &master, &new_key).await.unwrap().unwrap().id, env.id);

    let (ok, _) = sessiond(&schema, &master_hex, &["env", "rotate-key", &uuid::Uuid::new_v4().to_string()]);
    assert!(!ok);
    let (ok, out) = sessiond(&schema, &master_hex, &["env", "create", "--org", "a", "--project", "b", "--type", "qa"]);
    assert!(!ok && out.contains("dev, staging or prod"), "{out}");

    // bootstrap-dev is idempotent: the same key both times.
    let (ok, first) = sessiond(&schema, &master_hex, &["env", "bootstrap-dev"]);
    assert!(ok, "{first}");
    let (ok, second) = sessiond(&schema, &master_hex, &["env", "bootstrap-dev"]);
    assert!(ok);
    assert_eq!(key_in(&first, "tr_dev_"), key_in(&second, "tr_dev_"));
    let (ok, out) = sessiond(&schema, &master_hex, &["env", "bootstrap-dev", "--json"]);
    assert!(ok, "{out}");
    assert_eq!(json_in(&out)["secretKey"].as_str(), Some(key_in(&first, "tr_dev_").as_str()));
    // A wrong master key cannot open stored keys.
    let (ok, _) = sessiond(&schema, &"22".repeat(32), &["env", "bootstrap-dev"]);
    assert!(!ok);
}

#[tokio::test]
async fn jobs_list_retry_and_manual_trigger_from_the_cli() {
    let app = common::TestApp::spawn().await;
    let schema = sqlx::query_scalar::<_, String>("SELECT current_schema()").fetch_one(app.db()).await.unwrap();
    let master = app.state.config.master_key.clone().unwrap();
    let prefix = app.state.config.redis_prefix.clone();
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_sessiond"))
            .args(args)
            .env("DATABASE_URL", common::database_url())
            .env("DATABASE_SCHEMA", &schema)
            .env("SESSIOND_MASTER_KEY", &master)
            .env("REDIS_PREFIX", &prefix)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run sessiond");
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };

    // A job that fails for good: its table is broken under it.
    let s = app.create_session(common::session_body(Some("cli-jobs"))).await;
    let run_id: uuid::Uuid = sqlx::query_scalar("SELECT current_run_id FROM sessions WHERE external_id = 'cli-jobs'")
        .fetch_one(app.db())
        .await
        .unwrap();
    sqlx::query("ALTER TABLE task_runs RENAME COLUMN cancel_requested_at TO cancel_gone")
        .execute(app.db())
        .await
        .unwrap();
    let job = app.state.jobs.submit(&sessiond::runs::jobs::CancelRun { run_id }).await.unwrap();
    common::eventually(20, "job failed", || async {
        let row = sessiond::jobs::store::find(app.db(), job).await.unwrap().unwrap();
        (row.status == sessiond::jobs::store::JobStatus::Failed).then_some(())
    })
    .await;
    sqlx::query("ALTER TABLE task_runs RENAME COLUMN cancel_gone TO cancel_requested_at")
        .execute(app.db())
        .await
        .unwrap();

    let (ok, out) = cli(&["jobs", "list", "--failed"]);
    assert!(ok && out.contains(&job.to_string()) && out.contains("cancel-run"), "{out}");
    let (ok, out) = cli(&["jobs", "show", &job.to_string()]);
    assert!(ok && out.contains("attempt 5 failed"), "{out}");
    let (ok, out) = cli(&["jobs", "list", "--failed", "--json"]);
    assert!(ok, "{out}");
    let failed = json_in(&out);
    let listed = failed.as_array().unwrap().iter().find(|j| j["id"] == job.to_string()).expect("the job listed");
    assert_eq!((listed["kind"].as_str(), listed["status"].as_str()), (Some("cancel-run"), Some("failed")), "{listed}");
    let (ok, out) = cli(&["jobs", "show", &job.to_string(), "--json"]);
    assert!(ok, "{out}");
    let shown = json_in(&out);
    assert_eq!(shown["attemptLog"].as_array().map(Vec::len), Some(5), "{shown}");
    assert_eq!(shown["attemptLog"][4]["status"], "failed");
    let (ok, out) = cli(&["jobs", "retry", &job.to_string()]);
    assert!(ok, "{out}");
    common::eventually(10, "retried job succeeded", || async {
        let row = sessiond::jobs::store::find(app.db(), job).await.unwrap().unwrap();
        (row.status == sessiond::jobs::store::JobStatus::Succeeded).then_some(())
    })
    .await;
    let (ok, _) = cli(&["jobs", "retry", &job.to_string()]);
    assert!(!ok, "only failed jobs can be retried");
    // The retry is audited as the command line's (the refused one wrote nothing).
    let audited: Vec<(String, String, String)> =
        sqlx::query_as("SELECT action, target, actor_kind FROM audit_log WHERE action LIKE 'job.%'")
            .fetch_all(app.db())
            .await
            .unwrap();
    assert_eq!(audited, vec![("job.retry".into(), format!("job:{job}"), "cli".into())]);

    // Manual trigger: a fresh run with reason manual.
    let (ok, out) = cli(&["sessions", "trigger-run", "--env", &app.a.env.id.to_string(), "cli-jobs"]);
    assert!(ok && out.contains("reason manual"), "{out}");
    let reasons: Vec<String> = sqlx::query_scalar(
        "SELECT reason FROM session_runs sr JOIN sessions s ON s.id = sr.session_id WHERE s.external_id = 'cli-jobs' ORDER BY sr.created_at",
    )
    .fetch_all(app.db())
    .await
    .unwrap();
    assert_eq!(reasons, vec!["initial", "manual"]);
    let (_, now) = app.get("/api/v1/sessions/cli-jobs", &app.a.key).await;
    assert_ne!(now["currentRunId"], s["runId"]);
}

/// Runs the CLI against a running test server's schema, Redis prefix and
/// ClickHouse database. Asynchronously: the server runs on this test's runtime.
async fn sessiond_beside(app: &common::TestApp, args: &[&str]) -> String {
    let config = &app.state.config;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sessiond"))
        .args(args)
        .env("DATABASE_URL", common::database_url())
        .env("DATABASE_SCHEMA", config.database_schema.as_deref().unwrap())
        .env("REDIS_URL", &config.redis_url)
        .env("REDIS_PREFIX", &config.redis_prefix)
        .env("CLICKHOUSE_URL", &config.clickhouse_url)
        .env("CLICKHOUSE_DATABASE", &config.clickhouse_database)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output()
        .await
        .expect("run sessiond");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{args:?}: {text}");
    text
}

/// `sessiond clickhouse migrate | backfill --wait | backfills`: the CLI queues
/// the backfill, the server's job runtime copies it.
#[tokio::test]
async fn clickhouse_migrate_backfill_and_progress() {
    let app = common::TestApp::spawn().await;
    for i in 0..3 {
        app.create_session(common::session_body(Some(&format!("cli-{i}")))).await;
    }
    assert!(sessiond_beside(&app, &["clickhouse", "migrate"]).await.contains("4 applied now"));
    assert!(sessiond_beside(&app, &["clickhouse", "migrate"]).await.contains("0 applied now"));
    let args = ["clickhouse", "backfill", "--sessions", "--chunk-size", "2", "--wait"];
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), sessiond_beside(&app, &args))
        .await
        .expect("the backfill finishes");
    assert!(out.contains("of sessions queued") && !out.contains("of runs queued"), "{out}");
    assert!(out.contains("3 rows in 2 chunks, completed"), "{out}");
    let out = sessiond_beside(&app, &["clickhouse", "backfills"]).await;
    assert!(out.contains("sessions  completed") && out.contains(" 3 "), "{out}");
    let listed = json_in(&sessiond_beside(&app, &["clickhouse", "backfills", "--json"]).await);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!((listed[0]["table"].as_str(), listed[0]["status"].as_str()), (Some("sessions"), Some("completed")));
    assert_eq!(listed[0]["rowsCopied"], 3);
    // Audited as the command line's, like the dashboard's backfill as its operator's.
    let audited: Vec<(String, String, String)> =
        sqlx::query_as("SELECT action, target, actor_kind FROM audit_log").fetch_all(app.db()).await.unwrap();
    assert_eq!(audited, vec![("clickhouse.backfill".into(), "clickhouse".into(), "cli".into())]);
    let migrated = json_in(&sessiond_beside(&app, &["clickhouse", "migrate", "--json"]).await);
    assert_eq!(migrated["applied"], serde_json::json!([]));
    let n: u64 = app.state.analytics.client().query("SELECT count() FROM sessions_v1 FINAL").fetch_one().await.unwrap();
    assert_eq!(n, 3);
}

/// `sessiond operators create`: the password from the environment or stdin,
/// never a flag; a duplicate is an error unless `--if-missing`; a short
/// password is refused; the account then signs in.
#[tokio::test]
async fn operators_create_from_the_cli() {
    use std::io::Write;
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let master = "22".repeat(32);
    let run = |args: &[&str], password_env: Option<&str>, stdin: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sessiond"));
        cmd.args(args)
            .env("DATABASE_URL", common::database_url())
            .env("DATABASE_SCHEMA", &schema)
            .env("SESSIOND_MASTER_KEY", &master)
            .env("RUST_LOG", "warn")
            .env_remove("SESSIOND_OPERATOR_PASSWORD")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(p) = password_env {
            cmd.env("SESSIOND_OPERATOR_PASSWORD", p);
        }
        let mut child = cmd.spawn().expect("run sessiond");
        if let Some(input) = stdin {
            child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };
    let create = ["operators", "create", "--email", "Ops@Example.com", "--role", "admin"];
    let (ok, out) = run(&create, Some("a long enough password"), None);
    assert!(ok && out.contains("operator ops@example.com created (admin)"), "{out}");
    let (ok, out) = run(&create, Some("a long enough password"), None);
    assert!(!ok && out.contains("exists"), "{out}");
    let (ok, out) = run(&[&create[..], &["--if-missing"]].concat(), Some("a long enough password"), None);
    assert!(ok && out.contains("exists"), "{out}");
    let viewer = ["operators", "create", "--email", "viewer@example.com", "--role", "viewer"];
    let (ok, out) = run(&viewer, None, Some("short\n"));
    assert!(!ok && out.contains("at least 12"), "{out}");
    let (ok, out) = run(&viewer, None, Some("from standard input\n"));
    assert!(ok, "{out}");

    let mut config = Config::for_database(&common::database_url(), Some(schema.clone()));
    config.database_max_connections = 1;
    let pool = sessiond::db::connect(&config).await.unwrap();
    let op = sessiond::operators::authenticate(&pool, "viewer@example.com", "from standard input").await.unwrap();
    assert_eq!(op.map(|o| o.role), Some(sessiond::operators::Role::Viewer));
    assert!(sessiond::operators::authenticate(&pool, "ops@example.com", "wrong").await.unwrap().is_none());
}
