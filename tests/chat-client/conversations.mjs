#!/usr/bin/env node
// Trigger.dev's official chat clients against sessiond's example agent
// (`echo-agent`, which answers each message with "echo: <text>" as AI SDK UI
// message chunks): AgentChat (@trigger.dev/sdk/chat, for servers and scripts)
// and TriggerChatTransport (the AI SDK useChat transport), unchanged.
//
// It needs a worker serving "echo-agent"; tests/integration/chat_clients.rs
// runs one in-process. The agent paces its deltas by the message metadata's
// `echoDelayMs` (the clients' clientData), so a turn can be stopped or
// resumed in the middle.

import assert from "node:assert/strict";
import { AgentChat, TriggerChatTransport } from "@trigger.dev/sdk/chat";
import { sessions } from "@trigger.dev/sdk";
import { readUIMessageStream, uiMessageChunkSchema } from "ai";
import { check, claims, get, run, inputSeqs, turnCompletes, until, words } from "./harness.mjs";

const AGENT = "echo-agent";
const PACED = { echoDelayMs: 60 };

// Every chunk of a stream, checked against the AI SDK's own chunk schema.
async function chunksOf(stream) {
  const chunks = [];
  for await (const chunk of stream) {
    const valid = await uiMessageChunkSchema().validate(chunk);
    assert.ok(valid.success, `a UIMessageChunk: ${JSON.stringify(chunk)}`);
    chunks.push(chunk);
  }
  return chunks;
}

const textOf = (chunks) =>
  chunks
    .filter((c) => c.type === "text-delta")
    .map((c) => c.delta)
    .join("");

// The assistant message the AI SDK builds from a turn's chunks.
async function messageOf(chunks) {
  let last;
  const stream = new ReadableStream({
    start(controller) {
      for (const c of chunks) controller.enqueue(c);
      controller.close();
    },
  });
  for await (const message of readUIMessageStream({ stream })) last = message;
  return last;
}

const userMessage = (text) => ({ id: `u-${Math.random().toString(36).slice(2)}`, role: "user", parts: [{ type: "text", text }] });

// A transport whose sessions this script starts with the secret key (what a
// customer's server action does), recording every token it is handed.
function transportFor(clientData, tokens) {
  return new TriggerChatTransport({
    task: AGENT,
    baseURL: process.env.TRIGGER_API_URL,
    clientData,
    accessToken: async () => assert.fail("the session token should not need a refresh"),
    startSession: async ({ chatId, taskId }) => {
      const created = await sessions.start({
        type: "chat.agent",
        externalId: chatId,
        taskIdentifier: taskId,
        triggerConfig: { basePayload: { chatId } },
      });
      return { publicAccessToken: created.publicAccessToken };
    },
    onSessionChange: (_chatId, state) => {
      if (state?.publicAccessToken) tokens.push(state.publicAccessToken);
    },
  });
}

// One useChat-style turn: the transport's stream, read to its end.
async function transportTurn(transport, chatId, history, text) {
  history.push(userMessage(text));
  const stream = await transport.sendMessages({
    trigger: "submit-message",
    chatId,
    messageId: undefined,
    messages: history,
    abortSignal: undefined,
  });
  const chunks = await chunksOf(stream);
  const reply = await messageOf(chunks);
  history.push(reply);
  return { chunks, reply };
}

async function checks({ suffix }) {
  // --- AgentChat -----------------------------------------------------------------

  const chatId = `agent-chat-${suffix}`;
  const completed = [];
  let runId;
  const chat = new AgentChat({
    agent: AGENT,
    id: chatId,
    onTriggered: ({ runId: id }) => {
      runId = id;
    },
    onTurnComplete: ({ lastEventId }) => completed.push(lastEventId),
  });

  await check("AgentChat holds a three-turn conversation", async () => {
    for (const text of ["hello", "how are you", "goodbye for now"]) {
      const stream = await chat.sendMessage(text);
      assert.equal(await stream.text(), `echo: ${text}`);
    }
    assert.equal(completed.length, 3, "onTurnComplete once a turn");
    const ids = completed.map(Number);
    assert.ok(ids[0] < ids[1] && ids[1] < ids[2], `lastEventId moves on: ${completed}`);
    const ends = await turnCompletes(chatId);
    assert.deepEqual(ends.map((e) => e.answered), [0, 1, 2], "each turn-complete names the message it answered");
  });

  await check("a turn is one assistant message of valid UI message chunks, streamed in several deltas", async () => {
    const chunks = await chunksOf((await chat.sendMessage("parse me please")).stream);
    assert.deepEqual(
      chunks.map((c) => c.type),
      ["start", "text-start", "text-delta", "text-delta", "text-delta", "text-delta", "text-end", "finish"]
    );
    const reply = await messageOf(chunks);
    assert.equal(reply.role, "assistant");
    assert.deepEqual(
      reply.parts.filter((p) => p.type === "text").map((p) => p.text),
      ["echo: parse me please"]
    );
  });

  await check("the run payload keeps AgentChat's basePayload as given", async () => {
    assert.ok(runId?.startsWith("run_"), `onTriggered names the run: ${runId}`);
    const r = await get(`/api/v1/runs/${runId}`);
    assert.equal(r.payload.trigger, "preload");
    assert.equal(r.payload.chatId, chatId);
    assert.equal(r.payload.continuation, undefined, "a first run");
  });

  await check("AgentChat: stop in the middle of a long turn ends it; the next message is answered", async () => {
    const paced = new AgentChat({ agent: AGENT, id: `agent-stop-${suffix}`, clientData: PACED });
    const long = words(30);
    const stream = await paced.sendMessage(long);
    const seen = [];
    for await (const chunk of stream) {
      seen.push(chunk);
      if (seen.filter((c) => c.type === "text-delta").length === 3) await paced.stop();
    }
    const partial = textOf(seen);
    assert.ok(`echo: ${long}`.startsWith(partial), `a prefix of the answer: ${partial}`);
    assert.ok(partial.length < `echo: ${long}`.length, "cut short");
    const next = await paced.sendMessage("after the stop");
    assert.equal(await next.text(), "echo: after the stop");
    const ends = await turnCompletes(paced.id);
    assert.deepEqual(ends.map((e) => e.answered), [1, 2], "the stopped turn's end names the stop record");
  });

  await check("AgentChat: a turn resumes from the saved lastEventId after a dropped connection, nothing lost or repeated", async () => {
    const id = `agent-resume-${suffix}`;
    const first = new AgentChat({ agent: AGENT, id, clientData: PACED });
    const long = words(12);
    const stream = await first.sendMessage(long);
    const reader = stream.stream.getReader();
    const before = [];
    while (before.filter((c) => c.type === "text-delta").length < 4) {
      const { value, done } = await reader.read();
      assert.ok(!done, "the turn is still going");
      before.push(value);
    }
    // The connection drops; all the caller kept is the cursor.
    const saved = first.session.lastEventId;
    await reader.cancel();
    const resumed = new AgentChat({ agent: AGENT, id, clientData: PACED, session: { lastEventId: saved } });
    const after = await chunksOf(await resumed.reconnect());
    assert.equal(textOf(before) + textOf(after), `echo: ${long}`);
    const deltas = [...before, ...after].filter((c) => c.type === "text-delta");
    assert.equal(deltas.length, long.split(" ").length + 1, "each delta exactly once");
    assert.equal(after.at(-1).type, "finish");
  });

  await check("AgentChat: the agent exits idle and the next message boots a continuation that answers it", async () => {
    const id = `agent-idle-${suffix}`;
    let firstRun;
    const idle = new AgentChat({
      agent: AGENT,
      id,
      triggerConfig: { idleTimeoutInSeconds: 1 },
      onTriggered: ({ runId: r }) => {
        firstRun = r;
      },
    });
    assert.equal(await (await idle.sendMessage("before the nap")).text(), "echo: before the nap");
    let r;
    await until(`run ${firstRun} to exit idle`, async () => {
      r = await get(`/api/v1/runs/${firstRun}`);
      return r.status === "COMPLETED";
    });
    assert.deepEqual(r.output, { exit: "idle", turns: 1 });
    assert.equal(await (await idle.sendMessage("after the nap")).text(), "echo: after the nap");
    const s = await get(`/api/v1/sessions/${id}`);
    assert.notEqual(s.currentRunId, firstRun, "another run answered");
    const next = await get(`/api/v1/runs/${s.currentRunId}`);
    assert.equal(next.payload.continuation, true);
    assert.equal(next.payload.previousRunId, firstRun);
    assert.equal(next.payload.trigger, "preload", "the client's basePayload, as given");
  });

  await check("AgentChat: close ends the run cleanly; a later message is answered by a continuation", async () => {
    assert.equal(await chat.close(), true);
    let r;
    await until(`run ${runId} to end on close`, async () => {
      r = await get(`/api/v1/runs/${runId}`);
      return r.status === "COMPLETED";
    });
    assert.equal(r.output.exit, "closed");
    assert.equal(r.output.turns, 4);
    assert.equal(await (await chat.sendMessage("back again")).text(), "echo: back again");
    const ends = await turnCompletes(chatId);
    assert.deepEqual(ends.map((e) => e.answered), [0, 1, 2, 3, 5], "nothing answered twice; the close skipped");
  });

  // --- TriggerChatTransport ----------------------------------------------------------

  const tokens = [];
  const transport = transportFor(undefined, tokens);
  const transportChat = `transport-${suffix}`;
  const history = [];

  await check("TriggerChatTransport holds a three-turn conversation", async () => {
    for (const text of ["hi transport", "second turn", "third turn"]) {
      const { reply } = await transportTurn(transport, transportChat, history, text);
      assert.equal(reply.role, "assistant");
      assert.deepEqual(
        reply.parts.filter((p) => p.type === "text").map((p) => p.text),
        [`echo: ${text}`]
      );
    }
    assert.equal(history.length, 6);
  });

  await check("each turn-complete hands the transport a fresh token for its session", async () => {
    const ends = await turnCompletes(transportChat);
    assert.equal(ends.length, 3);
    const s = await get(`/api/v1/sessions/${transportChat}`);
    for (const end of ends) {
      assert.ok(end.token, "a public-access-token header");
      const c = claims(end.token);
      assert.deepEqual(c.scopes, [`read:sessions:${s.id}`, `write:sessions:${s.id}`]);
      assert.ok(c.exp - c.iat <= 3600, "an hour at most");
    }
    assert.equal(tokens.at(-1), ends.at(-1).token, "the transport took the newest one");
    const { reply } = await transportTurn(transport, transportChat, history, "with the new token");
    assert.equal(reply.parts.find((p) => p.type === "text").text, "echo: with the new token");
  });

  await check("TriggerChatTransport: stopGeneration mid-turn; the next message is answered", async () => {
    const paced = transportFor(PACED, []);
    const id = `transport-stop-${suffix}`;
    const h = [userMessage(words(30))];
    const stream = await paced.sendMessages({ trigger: "submit-message", chatId: id, messageId: undefined, messages: h, abortSignal: undefined });
    const reader = stream.getReader();
    let deltas = 0;
    while (deltas < 3) {
      const { value, done } = await reader.read();
      assert.ok(!done, "the turn is still going");
      if (value.type === "text-delta") deltas += 1;
    }
    assert.equal(await paced.stopGeneration(id), true);
    reader.releaseLock();
    await until("the stopped turn's end", async () => (await turnCompletes(id)).length === 1);
    // The agent honoured the stop: the turn's end names the stop record, .in's
    // second (an agent that ignored it would answer message 0 in full).
    assert.deepEqual(await inputSeqs(id), [0, 1], "the message, then the transport's stop");
    assert.deepEqual((await turnCompletes(id)).map((e) => e.answered), [1], "the stopped turn's end names the stop record");
    const { reply } = await transportTurn(paced, id, h, "after the stop");
    assert.equal(reply.parts.find((p) => p.type === "text").text, "echo: after the stop");
    assert.deepEqual((await turnCompletes(id)).map((e) => e.answered), [1, 2], "the next message answered once");
  });
}

await run(checks);
