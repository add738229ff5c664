#!/usr/bin/env node
// The official client against sessiond's rate limits: run with a low create
// limit (2 a second, set by official_client.rs), a burst of creates must all
// succeed, the client waiting out each 429 by its `x-ratelimit-reset`.
//
// The client's own backoff is made negligible (1-2 ms), so only a correct
// `x-ratelimit-reset` (epoch ms, in the future) gives it the wait that lets
// its retry pass; with 3 attempts and no such wait the burst fails.
//
// Environment, output and exit status: see harness.mjs.

import assert from "node:assert/strict";
import { check, run } from "./harness.mjs";

const FAST_RETRY = { retry: { maxAttempts: 3, minTimeoutInMs: 1, maxTimeoutInMs: 2, factor: 1, randomize: false } };
const CREATES = 8;

async function checks({ api, suffix }) {
  await check(`${CREATES} creates at a limit of 2 a second all succeed, waiting out x-ratelimit-reset`, async () => {
    const started = Date.now();
    for (let i = 0; i < CREATES; i++) {
      const created = await api.createSession(
        {
          type: "chat.agent",
          taskIdentifier: "echo-agent",
          triggerConfig: { basePayload: { chatId: `rl-${suffix}-${i}` } },
          externalId: `rl-${suffix}-${i}`,
        },
        FAST_RETRY,
      );
      assert.ok(created.id.startsWith("session_"), `created ${created.id}`);
    }
    // Admitted at the limit's pace: the burst cannot have passed in one window.
    const took = Date.now() - started;
    assert.ok(took >= 1000, `${CREATES} creates at 2 a second took only ${took} ms`);
  });
}

await run(checks, { watchdogMs: 60_000 });
