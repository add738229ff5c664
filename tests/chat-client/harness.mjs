// Shared pieces of the chat-client scripts: a tiny check runner, polling, the
// server's HTTP API for what the SDK does not cover, and SDK set-up.
//
// Environment: TRIGGER_API_URL (the server under test) and
// TRIGGER_SECRET_KEY (an environment's secret key).
//
// Output: "ok - <name>" per passing check, then "N passed, 0 failed". On the
// first failure: "not ok - <name>", the error, "N passed, 1 failed", exit 1.

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";
import { configure } from "@trigger.dev/sdk";

let passed = 0;

class CheckFailed extends Error {}

export async function check(name, fn) {
  try {
    await fn();
  } catch (err) {
    console.log(`not ok - ${name}`);
    console.error(err?.stack ?? String(err));
    throw new CheckFailed(name);
  }
  passed += 1;
  console.log(`ok - ${name}`);
}

// Polls `probe` every 25 ms until it returns a truthy value.
export async function until(what, probe, { timeoutMs = 20_000 } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value) return value;
    if (Date.now() > deadline) assert.fail(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(25);
  }
}

// GET on the server's API with the secret key (runs, sessions, records).
export async function get(path) {
  const resp = await fetch(`${process.env.TRIGGER_API_URL}${path}`, {
    headers: { Authorization: `Bearer ${process.env.TRIGGER_SECRET_KEY}` },
  });
  const body = await resp.json();
  assert.ok(resp.ok, `GET ${path}: ${resp.status} ${JSON.stringify(body)}`);
  return body;
}

// The turn-complete records on a session's `.out`, oldest first.
export async function turnCompletes(session) {
  const { records } = await get(`/realtime/v1/sessions/${encodeURIComponent(session)}/out/records`);
  const header = (r, name) => (r.headers ?? []).find(([k]) => k === name)?.[1];
  return records
    .filter((r) => header(r, "trigger-control") === "turn-complete")
    .map((r) => ({ seq: r.seqNum, answered: Number(header(r, "session-in-event-id")), token: header(r, "public-access-token") }));
}

// The seqs of a session's `.in` records, oldest first.
export async function inputSeqs(session) {
  const { records } = await get(`/realtime/v1/sessions/${encodeURIComponent(session)}/in/records`);
  return records.map((r) => r.seqNum);
}

// A JWT's claims, unverified (the server verified it when it was used).
export function claims(token) {
  return JSON.parse(Buffer.from(token.split(".")[1], "base64url").toString());
}

export const words = (n) => Array.from({ length: n }, (_, i) => `word${i}`).join(" ");

// Configures the SDK, runs `checks({ baseUrl, suffix })`, prints the summary
// and exits; gives up after `watchdogMs`.
export async function run(checks, { watchdogMs = 120_000 } = {}) {
  setTimeout(() => {
    console.log(`not ok - (watchdog: still running after ${watchdogMs} ms)`);
    console.log(`${passed} passed, 1 failed`);
    process.exit(1);
  }, watchdogMs).unref();
  const baseUrl = process.env.TRIGGER_API_URL;
  const secretKey = process.env.TRIGGER_SECRET_KEY;
  if (!baseUrl || !secretKey) {
    console.error("TRIGGER_API_URL and TRIGGER_SECRET_KEY must be set");
    console.log("0 passed, 1 failed");
    process.exit(1);
  }
  configure({ baseURL: baseUrl, accessToken: secretKey });
  const suffix = `${Date.now().toString(36)}-${randomBytes(4).toString("hex")}`;
  let failed = 0;
  try {
    await checks({ baseUrl, suffix });
  } catch (err) {
    if (!(err instanceof CheckFailed)) {
      console.log("not ok - (runner)");
      console.error(err?.stack ?? String(err));
    }
    failed = 1;
  }
  console.log(`${passed} passed, ${failed} failed`);
  // Exit explicitly: idle keep-alive sockets must not hold the process open.
  process.exit(failed);
}
