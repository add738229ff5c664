//! A job attempt that cannot finish: a `trigger-run` job whose attempt blocks
//! on its run's row, which the test holds locked. For the cases that cut an
//! attempt off mid-flight (a drain's grace running out, a SIGKILL) and then
//! watch who runs the job again.

use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::{eventually, schedules_file, session_body, TestApp};

pub struct HeldJob {
    /// The deployment; its own server runs no jobs, so a process the test
    /// starts takes the job.
    pub app: TestApp,
    pub job: Uuid,
    /// The run row's lock, until [`HeldJob::release`].
    lock: std::sync::Mutex<Option<Transaction<'static, Postgres>>>,
}

impl HeldJob {
    /// Creates a session whose trigger job is queued and its run row locked.
    pub async fn start(task: &str) -> HeldJob {
        let app = TestApp::spawn_with(|c| {
            c.run_jobs = false;
            c.job_schedules_file = Some(schedules_file(&[]));
        })
        .await;
        // No runtime here writes the queue's marker: without it the processes
        // the test starts would take the queue for lost and push the job twice.
        app.state.jobs.queue(sessiond::jobs::Lane::Engine).mark_intact().await.unwrap();
        let mut body = session_body(Some(task));
        body["taskIdentifier"] = serde_json::json!(task);
        let created = app.create_session(body).await;
        let run = created["runId"].as_str().unwrap().to_string();
        let job: Uuid = sqlx::query_scalar(
            "SELECT j.id FROM jobs j JOIN task_runs r ON r.id = (j.payload->>'run_id')::uuid
             WHERE j.kind = 'trigger-run' AND r.friendly_id = $1",
        )
        .bind(&run)
        .fetch_one(app.db())
        .await
        .unwrap();
        let mut lock = sessiond::db::begin(app.db()).await.unwrap();
        sqlx::query("SELECT 1 FROM task_runs WHERE friendly_id = $1 FOR UPDATE")
            .bind(&run)
            .execute(&mut *lock)
            .await
            .unwrap();
        HeldJob { app, job, lock: std::sync::Mutex::new(Some(lock)) }
    }

    /// Waits until an attempt of the job is under way (blocked on the lock).
    pub async fn attempt_under_way(&self) {
        eventually(15, "the attempt under way", || async {
            let running: i64 =
                sqlx::query_scalar("SELECT count(*) FROM job_attempts WHERE job_id = $1 AND status = 'running'")
                    .bind(self.job)
                    .fetch_one(self.app.db())
                    .await
                    .unwrap();
            (running == 1).then_some(())
        })
        .await;
    }

    /// Lets the attempt through.
    pub async fn release(&self) {
        let lock = self.lock.lock().unwrap().take();
        if let Some(lock) = lock {
            lock.rollback().await.unwrap();
        }
    }

    /// The statuses of the job's attempts, first to last.
    pub async fn attempt_statuses(&self) -> Vec<String> {
        sqlx::query_scalar("SELECT status FROM job_attempts WHERE job_id = $1 ORDER BY attempt")
            .bind(self.job)
            .fetch_all(self.app.db())
            .await
            .unwrap()
    }
}
