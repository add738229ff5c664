#!/usr/bin/env node
// A worker killed (SIGKILL) in the middle of a turn: the run stops
// heartbeating, the server replaces it, and the replacement answers the
// interrupted message exactly once, while AgentChat keeps reading the same turn.
//
// The script runs the workers itself (`$SESSIOND_BIN worker --task echo-agent`),
// so the run it kills is known to be on the worker it kills. The server's
// heartbeat timeout must be short (tests/integration/chat_clients.rs: 1.5 s).

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { AgentChat } from "@trigger.dev/sdk/chat";
import { check, get, run, turnCompletes, words } from "./harness.mjs";

function startWorker() {
  const bin = process.env.SESSIOND_BIN;
  assert.ok(bin, "SESSIOND_BIN names the sessiond binary");
  const args = ["worker", "--task", "echo-agent", "--url", process.env.TRIGGER_API_URL, "--key", process.env.TRIGGER_SECRET_KEY];
  return spawn(bin, args, { stdio: "ignore" });
}

const textOf = (chunks) =>
  chunks
    .filter((c) => c.type === "text-delta")
    .map((c) => c.delta)
    .join("");

async function checks({ suffix }) {
  const id = `killed-${suffix}`;
  const long = words(10);
  let firstRun;
  const chat = new AgentChat({
    agent: "echo-agent",
    id,
    clientData: { echoDelayMs: 250 },
    onTriggered: ({ runId }) => {
      firstRun = runId;
    },
  });
  let doomed = startWorker();
  let replacement;
  try {
    await check("a worker killed mid-turn is replaced and the interrupted message is answered in full, once", async () => {
      const chunks = [];
      for await (const chunk of await chat.sendMessage(long)) {
        chunks.push(chunk);
        if (doomed && chunks.filter((c) => c.type === "text-delta").length === 3) {
          doomed.kill("SIGKILL");
          doomed = undefined;
          replacement = startWorker();
        }
      }
      const starts = chunks.map((c, i) => (c.type === "start" ? i : -1)).filter((i) => i >= 0);
      assert.equal(starts.length, 2, "the killed run's partial answer, then the replacement's");
      const partial = textOf(chunks.slice(0, starts[1]));
      assert.ok(`echo: ${long}`.startsWith(partial) && partial.length < `echo: ${long}`.length, partial);
      assert.equal(textOf(chunks.slice(starts[1])), `echo: ${long}`, "the replacement answers it whole");
      assert.deepEqual((await turnCompletes(id)).map((e) => e.answered), [0], "one turn-complete, for message 0");
      const first = await get(`/api/v1/runs/${firstRun}`);
      const s = await get(`/api/v1/sessions/${id}`);
      assert.ok(
        first.status === "CRASHED" || (s.currentRunId === firstRun && first.attemptNumber > 1),
        `the killed run crashed (or retried): ${JSON.stringify({ status: first.status, current: s.currentRunId })}`
      );
    });

    await check("the conversation goes on after the replacement, nothing answered twice", async () => {
      assert.equal(await (await chat.sendMessage("still here")).text(), "echo: still here");
      assert.deepEqual((await turnCompletes(id)).map((e) => e.answered), [0, 1]);
    });
  } finally {
    doomed?.kill("SIGKILL");
    replacement?.kill("SIGKILL");
  }
}

await run(checks);
