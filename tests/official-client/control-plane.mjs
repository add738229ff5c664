#!/usr/bin/env node
// Control-plane conformance checks for sessiond, driven by the *official*
// Trigger.dev client (`ApiClient` from @trigger.dev/core, pinned in package.json).
//
// Every response goes through the client's own zod schemas
// (CreatedSessionResponseBody, RetrieveSessionResponseBody and the CursorPage
// wrapper around ListedSessionItem), so any wire-shape mismatch shows up as an
// ApiSchemaValidationError.
//
//
// Environment, output and exit status: see harness.mjs. All names carry the
// harness's random per-run suffix, so parallel runs against one server don't
// see each other's sessions.

import assert from "node:assert/strict";
import { setTimeout as sleep } from "node:timers/promises";
import { NO_RETRY, check, expectApiError, run } from "./harness.mjs";


// HTTP status expected when creating a session whose externalId starts with the
// reserved "session_" prefix. (Upstream Trigger.dev rejects this in its zod body
// validation, which answers 400; sessiond answers 422.)
const RESERVED_EXTERNAL_ID_STATUS = 422;
// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

function assertJwt(token) {
  assert.equal(typeof token, "string", "publicAccessToken is a string");
  const parts = token.split(".");
  assert.equal(parts.length, 3, `publicAccessToken has 3 dot-separated parts: ${token}`);
  for (const part of parts) {
    assert.match(part, /^[A-Za-z0-9_-]+$/, `JWT part is non-empty base64url: ${token}`);
  }
  const header = JSON.parse(Buffer.from(parts[0], "base64url").toString("utf8"));
  assert.equal(typeof header.alg, "string", "JWT header names an alg");
  const payload = JSON.parse(Buffer.from(parts[1], "base64url").toString("utf8"));
  assert.equal(typeof payload, "object", "JWT payload is a JSON object");
}

// Shape checks common to every session object (already zod-parsed by the client).
function assertSession(s) {
  assert.ok(s.id.startsWith("session_"), `id starts with "session_": ${s.id}`);
  assert.ok(s.createdAt instanceof Date && !Number.isNaN(s.createdAt.getTime()), "createdAt is a date");
  assert.ok(s.updatedAt instanceof Date && !Number.isNaN(s.updatedAt.getTime()), "updatedAt is a date");
  if (s.currentRunId != null) {
    assert.ok(s.currentRunId.startsWith("run_"), `currentRunId starts with "run_": ${s.currentRunId}`);
  }
}

const ids = (items) => items.map((s) => s.id);

async function collect(asyncIterable) {
  const out = [];
  for await (const item of asyncIterable) out.push(item);
  return out;
}

// ---------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------

async function checks({ api, suffix }) {
  const chatId = `chat-id-${suffix}`;
  const externalId = `chat-${suffix}`;
  const renamedExternalId = `chat-renamed-${suffix}`;
  const createBody = {
    type: "chat.agent",
    taskIdentifier: "echo-agent",
    triggerConfig: { basePayload: { chatId } },
    externalId,
    tags: [`t-${suffix}`],
    metadata: { a: 1 },
  };

  let created;

  // --- create / idempotent create -----------------------------------------

  await check("createSession creates a new session", async () => {
    created = await api.createSession(createBody);
    assertSession(created);
    assert.equal(created.isCached, false, "isCached");
    assert.ok(created.runId.startsWith("run_"), `runId starts with "run_": ${created.runId}`);
    assert.equal(created.currentRunId, created.runId, "currentRunId === runId");
    assertJwt(created.publicAccessToken);
    assert.equal(created.type, "chat.agent");
    assert.equal(created.taskIdentifier, "echo-agent");
    assert.equal(created.externalId, externalId);
    assert.deepEqual(created.tags, [`t-${suffix}`]);
    assert.deepEqual(created.metadata, { a: 1 });
    assert.equal(created.triggerConfig?.basePayload?.chatId, chatId);
    assert.equal(created.closedAt, null);
    assert.equal(created.closedReason, null);
  });

  await check("createSession again with the same externalId is cached", async () => {
    const again = await api.createSession(createBody);
    assertSession(again);
    assert.equal(again.isCached, true, "isCached");
    assert.equal(again.id, created.id, "same session id");
    assert.equal(again.runId, created.runId, "same runId");
    assert.equal(again.currentRunId, created.runId, "currentRunId === runId");
    assertJwt(again.publicAccessToken);
  });

  // --- retrieve -------------------------------------------------------------

  for (const [label, key] of [
    ["friendly id", () => created.id],
    ["externalId", () => externalId],
  ]) {
    await check(`retrieveSession by ${label}`, async () => {
      const s = await api.retrieveSession(key());
      assertSession(s);
      assert.equal(s.id, created.id);
      assert.equal(s.externalId, externalId);
      assert.equal(s.type, "chat.agent");
      assert.equal(s.taskIdentifier, "echo-agent");
      assert.equal(s.currentRunId, created.runId, "currentRunId === runId from create");
      assert.deepEqual(s.tags, [`t-${suffix}`]);
      assert.deepEqual(s.metadata, { a: 1 });
      assert.equal(s.triggerConfig?.basePayload?.chatId, chatId, "basePayload.chatId round-trips");
    });
  }

  // --- update -----------------------------------------------------------------

  const newTags = [`t-${suffix}`, `u-${suffix}`];

  await check("updateSession replaces tags and metadata", async () => {
    const updated = await api.updateSession(externalId, { tags: newTags, metadata: { b: 2 } });
    assertSession(updated);
    assert.equal(updated.id, created.id);
    assert.deepEqual(updated.tags, newTags);
    assert.deepEqual(updated.metadata, { b: 2 });

    const fetched = await api.retrieveSession(created.id);
    assert.deepEqual(fetched.tags, newTags, "tags persisted");
    assert.deepEqual(fetched.metadata, { b: 2 }, "metadata persisted");
  });

  // Note: current upstream Trigger.dev treats externalId as immutable and
  // answers 422 to a change (triggerdotdev/trigger.dev#3890). sessiond allows
  // renaming, and these three checks cover that.
  await check("updateSession sets a new externalId", async () => {
    const updated = await api.updateSession(externalId, { externalId: renamedExternalId });
    assertSession(updated);
    assert.equal(updated.id, created.id);
    assert.equal(updated.externalId, renamedExternalId);
  });

  await check("retrieveSession by the new externalId", async () => {
    const s = await api.retrieveSession(renamedExternalId);
    assert.equal(s.id, created.id);
    assert.equal(s.externalId, renamedExternalId);
    assert.deepEqual(s.tags, newTags);
  });

  await check("retrieveSession by the old externalId is 404", async () => {
    await expectApiError(() => api.retrieveSession(externalId, NO_RETRY), 404);
  });

  // --- list + cursor paging ---------------------------------------------------

  const pageType = `page-${suffix}`;
  const closedExternalId = `closed-${suffix}`;
  const CLOSED_INDEX = 2; // which of the paged sessions gets closed later
  const paged = []; // in creation order (oldest first)

  await check("createSession x5 for paging", async () => {
    for (let i = 0; i < 5; i++) {
      const s = await api.createSession({
        type: pageType,
        taskIdentifier: "echo-agent",
        triggerConfig: { basePayload: { chatId: `${pageType}-${i}` } },
        ...(i === CLOSED_INDEX ? { externalId: closedExternalId } : {}),
        tags: [`p-${suffix}`],
      });
      assertSession(s);
      assert.equal(s.isCached, false, `session ${i} isCached`);
      paged.push(s);
      // Keep createdAt strictly increasing even on a coarse clock, so the
      // expected newest-first order is unambiguous.
      await sleep(5);
    }
    assert.equal(new Set(ids(paged)).size, 5, "5 distinct ids");
  });

  const expectedDesc = ids(paged).reverse(); // newest first
  let lastPage;

  await check("listSessions first page: 2 newest, has next, no previous", async () => {
    const page = await api.listSessions({ type: pageType, limit: 2 });
    page.data.forEach(assertSession);
    assert.deepEqual(ids(page.data), expectedDesc.slice(0, 2));
    assert.ok(page.data.every((s) => s.type === pageType), "type filter applied");
    assert.equal(page.hasNextPage(), true, "hasNextPage");
    assert.equal(page.hasPreviousPage(), false, "hasPreviousPage");
  });

  await check("getNextPage walks all 5 sessions newest first", async () => {
    let page = await api.listSessions({ type: pageType, limit: 2 });
    const pages = [page];
    while (page.hasNextPage()) {
      assert.ok(pages.length < 10, "paging terminates");
      page = await page.getNextPage();
      page.data.forEach(assertSession);
      pages.push(page);
    }
    assert.deepEqual(pages.map((p) => p.data.length), [2, 2, 1], "page sizes");
    const all = pages.flatMap((p) => ids(p.data));
    assert.equal(new Set(all).size, 5, "5 distinct ids");
    assert.deepEqual(all, expectedDesc, "created-desc order across pages");
    lastPage = page;
  });

  await check("getPreviousPage from the last page returns the items before it", async () => {
    assert.equal(lastPage.hasPreviousPage(), true, "last page hasPreviousPage");
    const prev = await lastPage.getPreviousPage();
    // Same newest-first order as forward pages.
    assert.deepEqual(ids(prev.data), expectedDesc.slice(2, 4));
    // The client merges the new cursor into the previous request's query, so
    // this sends both page[before] and page[after]; the server must follow the
    // fresh one.
    const forward = await prev.getNextPage();
    assert.deepEqual(ids(forward.data), expectedDesc.slice(4, 5));
    const backAgain = await forward.getPreviousPage();
    assert.deepEqual(ids(backAgain.data), expectedDesc.slice(2, 4));
  });

  await check("for await over listSessions yields all 5", async () => {
    const all = await collect(api.listSessions({ type: pageType, limit: 2 }));
    assert.deepEqual(ids(all), expectedDesc);
  });

  // --- close (write-once) + status filter ----------------------------------------

  const target = paged[CLOSED_INDEX];
  let closedAt;

  await check("closeSession sets closedAt and closedReason", async () => {
    const closed = await api.closeSession(target.id, { reason: "done" });
    assertSession(closed);
    assert.equal(closed.id, target.id);
    assert.ok(closed.closedAt instanceof Date, "closedAt is set");
    assert.equal(closed.closedReason, "done");
    closedAt = closed.closedAt;
  });

  await check("closeSession again keeps the first closedAt and closedReason", async () => {
    await sleep(5);
    const again = await api.closeSession(target.id, { reason: "other" }, NO_RETRY);
    assert.equal(again.id, target.id);
    assert.equal(again.closedReason, "done", "closedReason is write-once");
    assert.ok(again.closedAt instanceof Date, "closedAt still set");
    assert.equal(again.closedAt.getTime(), closedAt.getTime(), "closedAt unchanged");
  });

  await check('listSessions status "CLOSED" returns only the closed session', async () => {
    const all = await collect(api.listSessions({ type: pageType, status: "CLOSED" }));
    assert.deepEqual(ids(all), [target.id]);
    assert.equal(all[0].closedReason, "done");
  });

  await check('listSessions status "ACTIVE" returns the other 4', async () => {
    const all = await collect(api.listSessions({ type: pageType, status: "ACTIVE" }));
    assert.deepEqual(
      ids(all),
      expectedDesc.filter((id) => id !== target.id)
    );
    assert.ok(all.every((s) => s.closedAt === null), "none closed");
  });

  // --- create errors ----------------------------------------------------------------

  await check("createSession with a closed session's externalId is 409", async () => {
    await expectApiError(
      () =>
        api.createSession(
          {
            type: pageType,
            taskIdentifier: "echo-agent",
            triggerConfig: { basePayload: { chatId: `${pageType}-again` } },
            externalId: closedExternalId,
          },
          NO_RETRY
        ),
      409
    );
  });

  await check(
    `createSession with externalId "session_abc" is ${RESERVED_EXTERNAL_ID_STATUS}`,
    async () => {
      await expectApiError(
        () =>
          api.createSession(
            {
              type: "chat.agent",
              taskIdentifier: "echo-agent",
              triggerConfig: { basePayload: { chatId } },
              externalId: "session_abc",
            },
            NO_RETRY
          ),
        RESERVED_EXTERNAL_ID_STATUS
      );
    }
  );
}

await run(checks);
