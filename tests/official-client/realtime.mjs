#!/usr/bin/env node
// Realtime conformance checks for sessiond, driven by the *official*
// Trigger.dev client (`ApiClient` from @trigger.dev/core, pinned in package.json).
//
// Covers the session channels end to end: initializeSessionStream,
// appendToSessionStream, subscribeToSessionStream (the client's own
// SSEStreamSubscription: v2 batch frames, Last-Event-ID resume, control records
// routed to onControl), readSessionStreamRecords, and
// createSessionStreamWaitpoint. Responses go through the client's zod schemas,
// so a wire-shape mismatch shows up as an ApiSchemaValidationError.
//
// It needs a worker serving task "echo-agent" (the example echo agent, which
// answers each chat message on `.in` with AI SDK UI message chunks on `.out`,
// ends each turn with a turn-complete control record, and exits after the session's
// idleTimeoutInSeconds). tests/official_client.rs runs one in-process. The
// "node-task" run used for the waitpoint checks is dequeued by this script.
//
// Environment, output and exit status: see harness.mjs.

import assert from "node:assert/strict";
import { setTimeout as sleep } from "node:timers/promises";
import { ApiClient } from "@trigger.dev/core/v3";
import { NO_RETRY, check, expectApiError, run, safeJson } from "./harness.mjs";

// The echo agent's idle timeout for the chat session (seconds).
const IDLE_TIMEOUT_SECS = 2;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

// Polls `probe` every 25 ms until it returns a truthy value; fails with `what`
// (and the last value seen from `describe`) after `timeoutMs`.
async function until(what, probe, { timeoutMs = 20_000, describe } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value) return value;
    if (Date.now() > deadline) {
      assert.fail(`timed out after ${timeoutMs} ms waiting for ${what}${describe ? `; saw ${describe()}` : ""}`);
    }
    await sleep(25);
  }
}

function assertJwt(token) {
  assert.equal(typeof token, "string", "token is a string");
  const parts = token.split(".");
  assert.equal(parts.length, 3, `token has 3 dot-separated parts: ${token}`);
}

const header = (headers, name) => (headers ?? []).find(([k]) => k === name)?.[1];

// Plain HTTP for the worker protocol, which the ApiClient does not cover.
async function http(method, url, token, body) {
  const resp = await fetch(url, {
    method,
    headers: {
      Authorization: `Bearer ${token}`,
      ...(body !== undefined ? { "Content-Type": "application/json" } : {}),
    },
    body: body !== undefined ? JSON.stringify(body) : undefined,
  });
  const text = await resp.text();
  let json;
  try {
    json = JSON.parse(text);
  } catch {
    json = text;
  }
  if (!resp.ok) {
    assert.fail(`${method} ${url} answered ${resp.status}: ${text}`);
  }
  return json;
}

// Consumes a subscribeToSessionStream() ReadableStream in the background,
// collecting its chunks. `done` resolves when the stream ends.
function consume(stream) {
  const state = { chunks: [], ended: false, error: undefined };
  const reader = stream.getReader();
  state.done = (async () => {
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        state.chunks.push(value);
      }
    } catch (err) {
      state.error = err;
    } finally {
      state.ended = true;
    }
  })();
  return state;
}

// A user message record as the official chat clients append it to `.in`.
const chatMessage = (text, chatId) =>
  JSON.stringify({
    kind: "message",
    payload: { message: { id: `u-${text}`, role: "user", parts: [{ type: "text", text }] }, chatId, trigger: "submit-message" },
  });

// The echo agent's chunks for one turn of a one-word message.
const TURN_CHUNK_TYPES = ["start", "text-start", "text-delta", "text-delta", "text-end", "finish"];
const range = (from, to) => Array.from({ length: to - from }, (_, i) => from + i);

const textOf = (chunks) =>
  chunks
    .filter((c) => c?.type === "text-delta")
    .map((c) => c.delta)
    .join("");

// ---------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------

async function checks({ api, baseUrl, secretKey, suffix }) {
  const externalId = `rt-${suffix}`;
  const chatId = `chat-id-${suffix}`;

  let session;
  // Background subscription on the chat session's .out (steps 3-4).
  const live = { abort: new AbortController(), parts: [], controls: [], completed: false };
  let liveState;
  // Records of turn 1 and turn 2 as seen by onPart: { seqs, controlSeq }.
  const turns = [];
  let firstRunId;
  // The dequeued "node-task" run (step 7) and its heartbeat timer.
  let nodeRun;
  let heartbeat;

  try {
    // --- 1. create -------------------------------------------------------------

    await check("createSession (echo-agent, idleTimeoutInSeconds 2)", async () => {
      session = await api.createSession({
        type: "chat.agent",
        taskIdentifier: "echo-agent",
        externalId,
        triggerConfig: { basePayload: { chatId }, idleTimeoutInSeconds: IDLE_TIMEOUT_SECS },
      });
      assert.ok(session.id.startsWith("session_"), `id: ${session.id}`);
      assert.equal(session.isCached, false);
      assert.equal(session.externalId, externalId);
      assert.ok(session.runId.startsWith("run_"), `runId: ${session.runId}`);
    });

    // --- 2. initialize -----------------------------------------------------------

    await check('initializeSessionStream(externalId, "out") is v2 with append URL and write token', async () => {
      const init = await api.initializeSessionStream(externalId, "out");
      assert.equal(init.version, "v2");
      assert.equal(init.headers["x-stream-version"], "v2");
      // The append URL names the session by its friendly id.
      assert.equal(init.headers["x-append-url"], `${baseUrl}/realtime/v1/sessions/${session.id}/out/append`);
      assertJwt(init.headers["x-write-token"]);
      const expires = new Date(init.headers["x-write-token-expires-at"]);
      assert.ok(expires.getTime() > Date.now(), `x-write-token-expires-at in the future: ${init.headers["x-write-token-expires-at"]}`);
    });

    // --- 3. first turn -------------------------------------------------------------

    await check('subscribeToSessionStream(id, "out") opens', async () => {
      const stream = await api.subscribeToSessionStream(session.id, "out", {
        signal: live.abort.signal,
        timeoutInSeconds: 60,
        onPart: (part) => live.parts.push(part),
        onControl: (control) => live.controls.push(control),
        onComplete: () => {
          live.completed = true;
        },
      });
      assert.ok(stream instanceof ReadableStream, "a ReadableStream");
      liveState = consume(stream);
    });

    await check("appendToSessionStream(.in) returns ok", async () => {
      // The client sends `part` as the raw request body (plus a fresh X-Part-Id).
      const res = await api.appendToSessionStream(externalId, "in", chatMessage("hello", chatId));
      assert.equal(res.ok, true);
    });

    await check('the subscription streams UI message chunks "echo: hello" and a turn-complete control', async () => {
      await until(
        "turn-complete #1 and the text",
        () => live.controls.length >= 1 && textOf(liveState.chunks) === "echo: hello",
        { describe: () => safeJson({ chunks: liveState.chunks, controls: live.controls, error: String(liveState.error) }) }
      );
      assert.equal(liveState.error, undefined, "no stream error");
      assert.deepEqual(liveState.chunks.map((c) => c?.type), TURN_CHUNK_TYPES, safeJson(liveState.chunks));
      assert.deepEqual(textOf(liveState.chunks.slice(2, 3)), "echo: ", "one delta a word");
      assert.equal(live.controls.length, 1, "one control");
      const control = live.controls[0];
      assert.equal(control.subtype, "turn-complete");
      assert.equal(header(control.headers, "session-in-event-id"), "0", "answers .in seq 0");
      assert.equal(typeof control.seqNum, "number");
      assert.equal(typeof control.timestamp, "number");
      // onPart sees every record, data and control, with seq_num ids in order.
      const ids = live.parts.map((p) => p.id);
      assert.deepEqual(ids, range(0, 7).map(String), "onPart ids");
      assert.equal(control.seqNum, 6);
      const recordIds = live.parts.slice(0, 6).map((p) => p.recordId);
      assert.equal(new Set(recordIds).size, 6, `a unique record id from each envelope: ${safeJson(recordIds)}`);
      turns.push({ seqs: range(0, 7), controlSeq: 6 });
    });

    // --- 4. idle exit, continuation, same subscription -------------------------------

    await check("retrieveSession names the run that answered", async () => {
      const s = await api.retrieveSession(session.id);
      assert.ok(s.currentRunId?.startsWith("run_"), `currentRunId: ${s.currentRunId}`);
      firstRunId = s.currentRunId;
    });

    await check(`the run exits after the ${IDLE_TIMEOUT_SECS}s idle timeout`, async () => {
      await sleep(IDLE_TIMEOUT_SECS * 1000 + 500);
      let run;
      await until(
        `run ${firstRunId} to complete`,
        async () => {
          run = await http("GET", `${baseUrl}/api/v1/runs/${firstRunId}`, secretKey);
          return run.status === "COMPLETED";
        },
        { timeoutMs: 15_000, describe: () => safeJson(run) }
      );
      assert.equal(run.output?.exit, "idle", `exit reason: ${safeJson(run.output)}`);
    });

    await check("a second message boots a new run and the same subscription gets its reply", async () => {
      const res = await api.appendToSessionStream(externalId, "in", chatMessage("again", chatId));
      assert.equal(res.ok, true);
      await until(
        "turn-complete #2 and the text",
        () => live.controls.length >= 2 && textOf(liveState.chunks) === "echo: helloecho: again",
        { describe: () => safeJson({ chunks: liveState.chunks, controls: live.controls, error: String(liveState.error) }) }
      );
      assert.equal(liveState.ended, false, "the subscription is still open");
      assert.equal(textOf(liveState.chunks.slice(6)), "echo: again");
      const control = live.controls[1];
      assert.equal(control.subtype, "turn-complete");
      assert.equal(header(control.headers, "session-in-event-id"), "1", "answers .in seq 1");
      assert.equal(control.seqNum, 13);
      assert.deepEqual(live.parts.map((p) => p.id), range(0, 14).map(String), "onPart ids");
      turns.push({ seqs: range(7, 14), controlSeq: 13 });

      const s = await api.retrieveSession(externalId);
      assert.ok(s.currentRunId?.startsWith("run_"), `currentRunId: ${s.currentRunId}`);
      assert.notEqual(s.currentRunId, firstRunId, "a different run answered");
    });

    await check("aborting the signal ends the subscription cleanly", async () => {
      live.abort.abort();
      await Promise.race([liveState.done, sleep(5_000)]);
      assert.equal(liveState.ended, true, "stream ended");
      assert.equal(liveState.error, undefined, "no error");
      assert.equal(live.completed, true, "onComplete fired");
    });

    // --- 5. records ------------------------------------------------------------------

    await check('readSessionStreamRecords(id, "out") returns every record, unwrapped', async () => {
      const { records } = await api.readSessionStreamRecords(session.id, "out");
      assert.deepEqual(records.map((r) => r.seqNum), range(0, 14));
      const data = records.filter((r) => !header(r.headers, "trigger-control"));
      assert.deepEqual(data.map((r) => r.data.type), [...TURN_CHUNK_TYPES, ...TURN_CHUNK_TYPES]);
      assert.deepEqual(
        data.filter((r) => r.data.type === "text-delta").map((r) => r.data.delta),
        ["echo: ", "hello", "echo: ", "again"]
      );
      assert.equal(new Set(data.map((r) => r.id)).size, 12, "a unique id from each envelope");
      const controls = records.filter((r) => header(r.headers, "trigger-control"));
      assert.deepEqual(controls.map((r) => r.seqNum), [6, 13]);
      for (const c of controls) {
        assert.equal(header(c.headers, "trigger-control"), "turn-complete");
        assert.equal(c.data, null, "a control record has no data");
      }
    });

    await check("readSessionStreamRecords with afterEventId returns only later records", async () => {
      const { records } = await api.readSessionStreamRecords(externalId, "out", {
        afterEventId: String(turns[0].controlSeq),
      });
      assert.deepEqual(records.map((r) => r.seqNum), turns[1].seqs);
      const afterLast = await api.readSessionStreamRecords(externalId, "out", { afterEventId: "13" });
      assert.deepEqual(afterLast.records, []);
    });

    // --- 6. resume ---------------------------------------------------------------------

    await check("subscribeToSessionStream with lastEventId resumes right after it", async () => {
      const abort = new AbortController();
      const parts = [];
      const controls = [];
      let completed = false;
      const started = Date.now();
      const stream = await api.subscribeToSessionStream(session.id, "out", {
        lastEventId: String(turns[0].controlSeq),
        timeoutInSeconds: 1,
        signal: abort.signal,
        onPart: (p) => parts.push(p),
        onControl: (c) => controls.push(c),
        onComplete: () => {
          completed = true;
        },
      });
      const state = consume(stream);
      // A safety net only: the server closes the 1 s long-poll window and the
      // client ends the stream on a clean close.
      const safety = setTimeout(() => abort.abort(), 10_000);
      await state.done;
      clearTimeout(safety);
      assert.equal(abort.signal.aborted, false, "the stream ended by itself, not by the safety abort");
      assert.equal(state.error, undefined, "no error");
      assert.equal(completed, true, "onComplete fired");
      assert.ok(Date.now() - started < 8_000, `ended after the window (${Date.now() - started} ms)`);
      assert.deepEqual(parts.map((p) => p.id), turns[1].seqs.map(String), "exactly the records after the cursor");
      assert.equal(textOf(state.chunks), "echo: again");
      assert.deepEqual(controls.map((c) => [c.subtype, c.seqNum]), [["turn-complete", 13]]);
    });

    await check('subscribeToSessionStream from "latest" sees no old records', async () => {
      const parts = [];
      const abort = new AbortController();
      const stream = await api.subscribeToSessionStream(session.id, "out", {
        from: "latest",
        timeoutInSeconds: 1,
        signal: abort.signal,
        onPart: (p) => parts.push(p),
      });
      const state = consume(stream);
      const safety = setTimeout(() => abort.abort(), 10_000);
      await state.done;
      clearTimeout(safety);
      assert.equal(abort.signal.aborted, false, "the stream ended by itself");
      assert.equal(state.error, undefined, "no error");
      assert.deepEqual(parts, []);
    });

    await check("a client holding only the session's publicAccessToken reads .out", async () => {
      const browser = new ApiClient(baseUrl, session.publicAccessToken);
      const { records } = await browser.readSessionStreamRecords(externalId, "out", { afterEventId: String(turns[0].controlSeq) });
      assert.deepEqual(records.map((r) => r.seqNum), turns[1].seqs);
      const parts = [];
      const stream = await browser.subscribeToSessionStream(externalId, "out", {
        lastEventId: "11",
        timeoutInSeconds: 1,
        onPart: (p) => parts.push(p),
      });
      const state = consume(stream);
      await Promise.race([state.done, sleep(10_000)]);
      assert.equal(state.ended, true, "stream ended");
      assert.equal(state.error, undefined, "no error");
      assert.deepEqual(parts.map((p) => p.id), ["12", "13"]);
    });

    // --- 7. session-stream waitpoints ---------------------------------------------------

    let nodeSession;
    const waitpoint = {};
    const appended = JSON.stringify({ data: { text: "ping" }, id: `w-${suffix}` });

    await check('createSession (node-task) and dequeue its run via the worker protocol', async () => {
      nodeSession = await api.createSession({
        type: "node.task",
        taskIdentifier: "node-task",
        externalId: `rt-node-${suffix}`,
        triggerConfig: { basePayload: { chatId: `node-${suffix}` } },
      });
      assert.equal(nodeSession.isCached, false);
      const { runs } = await http("POST", `${baseUrl}/api/v1/worker/dequeue`, secretKey, {
        tasks: ["node-task"],
        waitSeconds: 5,
      });
      assert.equal(runs.length, 1, `one run dequeued: ${safeJson(runs)}`);
      nodeRun = runs[0];
      assert.equal(nodeRun.id, nodeSession.runId);
      assert.equal(nodeRun.sessionId, nodeSession.id);
      assert.equal(typeof nodeRun.token, "string");
      // Keep the run alive while it waits (the test server's heartbeat timeout is short).
      const every = Math.max(100, Math.min(nodeRun.heartbeatIntervalMs ?? 500, 500));
      heartbeat = setInterval(() => {
        http("POST", `${baseUrl}/api/v1/runs/${nodeRun.id}/heartbeat`, nodeRun.token).catch((err) =>
          console.error(`heartbeat failed: ${err}`)
        );
      }, every);
    });

    await check("createSessionStreamWaitpoint creates a waitpoint (isCached false)", async () => {
      const res = await api.createSessionStreamWaitpoint(nodeRun.id, { session: nodeSession.id, io: "in", lastSeqNum: -1 });
      assert.equal(typeof res.waitpointId, "string");
      assert.equal(res.isCached, false);
      waitpoint.plain = res.waitpointId;
    });

    await check("createSessionStreamWaitpoint with an idempotencyKey is cached the second time", async () => {
      const body = {
        session: `rt-node-${suffix}`, // by externalId this time
        io: "in",
        lastSeqNum: -1,
        idempotencyKey: `idem-${suffix}`,
        idempotencyKeyTTL: "1h",
        timeout: "1m",
        tags: ["rt"],
      };
      const first = await api.createSessionStreamWaitpoint(nodeRun.id, body);
      assert.equal(first.isCached, false, "first is new");
      assert.notEqual(first.waitpointId, waitpoint.plain);
      const second = await api.createSessionStreamWaitpoint(nodeRun.id, body);
      assert.equal(second.isCached, true, "second is cached");
      assert.equal(second.waitpointId, first.waitpointId, "same waitpoint");
      waitpoint.keyed = first.waitpointId;
    });

    await check("the waitpoints are WAITING before anything is appended", async () => {
      for (const id of [waitpoint.plain, waitpoint.keyed]) {
        const w = await http("GET", `${baseUrl}/api/v1/runs/${nodeRun.id}/waitpoints/${id}?waitSeconds=0`, nodeRun.token);
        assert.equal(w.status, "WAITING", `${id}: ${safeJson(w)}`);
      }
    });

    await check("appending to .in completes both waitpoints with the record", async () => {
      const res = await api.appendToSessionStream(nodeSession.id, "in", appended);
      assert.equal(res.ok, true);
      for (const id of [waitpoint.plain, waitpoint.keyed]) {
        let w;
        await until(
          `waitpoint ${id} to complete`,
          async () => {
            w = await http("GET", `${baseUrl}/api/v1/runs/${nodeRun.id}/waitpoints/${id}?waitSeconds=5`, nodeRun.token);
            return w.status !== "WAITING";
          },
          { timeoutMs: 20_000, describe: () => safeJson(w) }
        );
        assert.equal(w.status, "COMPLETED", safeJson(w));
        assert.equal(w.output?.body, appended, "output.body is the appended part");
        assert.equal(w.output?.seqNum, 0);
      }
    });

    await check("createPublicToken with the run's token mints read/write on its own session, and no more", async () => {
      const asRun = new ApiClient(baseUrl, nodeRun.token);
      const { token } = await asRun.createPublicToken({
        scopes: [`read:sessions:${nodeSession.id}`, `write:sessions:${nodeSession.id}`],
        expirationTime: "1h",
      });
      assertJwt(token);
      const minted = new ApiClient(baseUrl, token);
      const { records } = await minted.readSessionStreamRecords(nodeSession.id, "in");
      assert.equal(records.length, 1, "the minted token reads the run's session");
      await expectApiError(() => asRun.createPublicToken({ scopes: [`read:sessions:${session.id}`] }), 403);
      await expectApiError(
        () => asRun.createPublicToken({ scopes: [`read:sessions:${nodeSession.id}`], expirationTime: "2h" }),
        422
      );
    });

    await check("the node-task run completes", async () => {
      clearInterval(heartbeat);
      heartbeat = undefined;
      const run = await http("POST", `${baseUrl}/api/v1/runs/${nodeRun.id}/complete`, nodeRun.token, { output: { ok: true } });
      assert.equal(run.status, "COMPLETED");
    });

    // --- 8. close ----------------------------------------------------------------------

    await check("after closeSession, appendToSessionStream fails with 400", async () => {
      const closed = await api.closeSession(session.id, { reason: "done" });
      assert.ok(closed.closedAt instanceof Date, "closedAt set");
      await expectApiError(
        () => api.appendToSessionStream(externalId, "in", chatMessage("late", chatId), NO_RETRY),
        400
      );
      await expectApiError(() => api.appendToSessionStream(session.id, "out", "{}", NO_RETRY), 400);
      await expectApiError(() => api.initializeSessionStream(externalId, "out", NO_RETRY), 400);
    });

    await check("a closed session's records stay readable", async () => {
      const { records } = await api.readSessionStreamRecords(externalId, "out");
      assert.deepEqual(records.slice(0, 14).map((r) => r.seqNum), range(0, 14));
    });
  } catch (err) {
    if (heartbeat) clearInterval(heartbeat);
    live.abort.abort();
    throw err;
  }
}

// A hung request must not hang the caller: give up after two minutes.
const WATCHDOG_MS = 120_000;

await run(checks, { trimTrailingSlash: true, watchdogMs: WATCHDOG_MS });
