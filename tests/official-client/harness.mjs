// Shared test harness for the official-client conformance scripts
// (control-plane.mjs, realtime.mjs).
//
// Environment:
//   TRIGGER_API_URL     base URL of the server under test, e.g. http://127.0.0.1:41234
//   TRIGGER_SECRET_KEY  environment secret key, e.g. tr_dev_...
//
// Output: one "ok - <name>" line per passing check and a final
// "N passed, 0 failed" line. On the first failure it prints "not ok - <name>",
// the error (with the response body for API errors), "N passed, 1 failed",
// and exits with code 1.

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { ApiClient, ApiError, ApiSchemaValidationError } from "@trigger.dev/core/v3";

// The client retries 408/409/429/5xx and connection errors by default (up to
// 5 attempts with backoff). Use this for calls that are expected to fail, so
// they fail at once.
export const NO_RETRY = { retry: { maxAttempts: 1 } };

// ---------------------------------------------------------------------------
// Tiny test runner
// ---------------------------------------------------------------------------

let passed = 0;

export class CheckFailed extends Error {}

export async function check(name, fn) {
  try {
    await fn();
  } catch (err) {
    console.log(`not ok - ${name}`);
    console.error(describeError(err));
    throw new CheckFailed(name);
  }
  passed += 1;
  console.log(`ok - ${name}`);
}

export function describeError(err, depth = 0) {
  if (depth > 3) return "";
  const lines = [];
  if (err instanceof ApiError) {
    lines.push(`${err.constructor.name} (HTTP status ${err.status ?? "none"}): ${err.message}`);
    if (err instanceof ApiSchemaValidationError) {
      lines.push(`response body (failed the client's schema): ${safeJson(err.rawBody)}`);
    } else if (err.body !== undefined) {
      lines.push(`response body: ${safeJson(err.body)}`);
    }
  } else {
    lines.push(String(err?.stack ?? err));
  }
  if (err?.cause !== undefined) {
    lines.push(`caused by: ${describeError(err.cause, depth + 1)}`);
  }
  return lines.join("\n");
}

export function safeJson(value) {
  try {
    return JSON.stringify(value);
  } catch {
    return String(value);
  }
}

// Awaits `call()` and requires it to fail with an ApiError carrying `status`.
export async function expectApiError(call, status) {
  let result;
  try {
    result = await call();
  } catch (err) {
    if (!(err instanceof ApiError) || err instanceof ApiSchemaValidationError) throw err;
    if (err.status !== status) {
      const mismatch = new assert.AssertionError({
        message: `expected an ApiError with HTTP status ${status}, got ${err.status}`,
        actual: err.status,
        expected: status,
        operator: "strictEqual",
      });
      mismatch.cause = err; // describeError prints the response body from it
      throw mismatch;
    }
    return err;
  }
  assert.fail(`expected an ApiError with HTTP status ${status}, but the call succeeded: ${safeJson(result)}`);
}

// ---------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------

// Reads the environment, builds the client and a random per-run suffix (so
// parallel runs against one server don't see each other's objects), runs
// `checks({ api, baseUrl, secretKey, suffix })`, prints the summary line and
// exits with 0 on success or 1 on the first failure.
//
// Options:
//   trimTrailingSlash  strip trailing "/" from TRIGGER_API_URL
//   watchdogMs         give up (print a failure and exit 1) after this long
export async function run(checks, { trimTrailingSlash = false, watchdogMs } = {}) {
  if (watchdogMs !== undefined) {
    // A hung request must not hang the caller.
    setTimeout(() => {
      console.log(`not ok - (watchdog: still running after ${watchdogMs} ms)`);
      console.log(`${passed} passed, 1 failed`);
      process.exit(1);
    }, watchdogMs).unref();
  }
  // Exit explicitly: idle keep-alive sockets must not hold the process open.
  process.exit(await main(checks, trimTrailingSlash));
}

async function main(checks, trimTrailingSlash) {
  const rawUrl = process.env.TRIGGER_API_URL;
  const baseUrl = trimTrailingSlash ? rawUrl?.replace(/\/+$/, "") : rawUrl;
  const secretKey = process.env.TRIGGER_SECRET_KEY;
  if (!baseUrl || !secretKey) {
    console.error("TRIGGER_API_URL and TRIGGER_SECRET_KEY must be set");
    console.log("0 passed, 1 failed");
    return 1;
  }

  const api = new ApiClient(baseUrl, secretKey);
  const suffix = `${Date.now().toString(36)}-${randomBytes(4).toString("hex")}`;

  try {
    await checks({ api, baseUrl, secretKey, suffix });
  } catch (err) {
    if (!(err instanceof CheckFailed)) {
      console.log("not ok - (runner)");
      console.error(describeError(err));
    }
    console.log(`${passed} passed, 1 failed`);
    return 1;
  }

  console.log(`${passed} passed, 0 failed`);
  return 0;
}
