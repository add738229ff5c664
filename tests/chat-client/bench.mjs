#!/usr/bin/env node
// Turn latency through AgentChat against the example agent: from
// `sendMessage` to the first text delta, and to the end of the turn (the
// stream closes at turn-complete). Run by `cargo bench --bench chat`, which
// starts the server and an echo-agent worker; TURNS (default 200) after a
// short warm-up. Prints a line per figure in benches/common's format.

import { performance } from "node:perf_hooks";
import { randomBytes } from "node:crypto";
import { configure } from "@trigger.dev/sdk";
import { AgentChat } from "@trigger.dev/sdk/chat";

const turns = Number(process.env.TURNS ?? 200);
const warmup = 5;
configure({ baseURL: process.env.TRIGGER_API_URL, accessToken: process.env.TRIGGER_SECRET_KEY });

const chat = new AgentChat({ agent: "echo-agent", id: `bench-${randomBytes(4).toString("hex")}` });
const first = [];
const complete = [];
for (let i = 0; i < warmup + turns; i++) {
  const started = performance.now();
  const stream = await chat.sendMessage(`ping ${i}`);
  let firstDelta;
  let text = "";
  for await (const chunk of stream) {
    if (chunk.type === "text-delta") {
      firstDelta ??= performance.now();
      text += chunk.delta;
    }
  }
  const ended = performance.now();
  if (text !== `echo: ping ${i}`) throw new Error(`turn ${i} answered ${JSON.stringify(text)}`);
  if (i >= warmup) {
    first.push(firstDelta - started);
    complete.push(ended - started);
  }
}
if ((await chat.close()) !== true) throw new Error("close was not accepted");

const pct = (sorted, p) => sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(sorted.length * p) - 1))];
function summary(name, key, samples) {
  const s = [...samples].sort((a, b) => a - b);
  const f = (v) => v.toFixed(2).padStart(7);
  console.log(`${name.padEnd(36)} n=${String(s.length).padEnd(7)} p50 ${f(pct(s, 0.5))} ms  p99 ${f(pct(s, 0.99))} ms  max ${f(s.at(-1))} ms`);
  console.log(`figure: ${key}.p50 ${pct(s, 0.5).toFixed(3)} ms`);
  console.log(`figure: ${key}.p99 ${pct(s, 0.99).toFixed(3)} ms`);
}
summary("sendMessage → first text delta", "chat.first_delta", first);
summary("sendMessage → turn-complete", "chat.turn_complete", complete);
process.exit(0);
