// The agent playground in headless Chromium: an admin starts a session of
// echo-agent, holds a two-turn conversation (each reply streams in over the
// public realtime endpoints and renders as a bubble; the raw .in and .out
// panes show the records), reloads and reopens the session and sees its
// history, stops a slow reply, then does the same in a 390 px window without
// sideways scroll.
//
// Run by the Rust test in tests/integration/dashboard_playground.rs, which
// starts the server and an echo-agent worker for PLAYGROUND_ENV.
//
// stdout: harness.mjs's protocol.

import {
    PHONE,
    DESKTOP,
    assert,
    assertNoSidewaysScroll,
    check,
    expectSelector,
    finish,
    goto,
    logIn,
    newPage,
    pathname,
    requireEnv,
    shot,
    start,
    submitForm,
} from './harness.mjs';

// Generous on purpose: the suite runs eight tests at once on two cores, and
// these bound only a failure, never a passing run.
const WATCHDOG = 230_000; // the Rust test gives the run 240 s
const LIVE_TIMEOUT = 20_000; // both SSE streams to open
const REPLY_TIMEOUT = 30_000; // a reply to stream in (a run may need to start first)

const { ADMIN_EMAIL, ADMIN_PASSWORD, PLAYGROUND_ENV } = await requireEnv([
    'DASHBOARD_URL',
    'ADMIN_EMAIL',
    'ADMIN_PASSWORD',
    'PLAYGROUND_ENV',
]);
const ADMIN = { email: ADMIN_EMAIL, password: ADMIN_PASSWORD };
const READY = '#playground[data-in-ready][data-out-ready]';

// What the conversation shows: each bubble's role and text, in order, and
// how many turns ended.
async function conversation(page) {
    return page.evaluate(() => ({
        bubbles: Array.from(document.querySelectorAll('#pg-messages > li.pg-msg')).map((li) => ({
            role: li.classList.contains('user') ? 'user' : 'assistant',
            text: li.querySelector('.pg-text').textContent,
            done: li.dataset.done === 'true',
        })),
        turnEnds: document.querySelectorAll('#pg-messages > li.pg-turn-end').length,
    }));
}

// In the page: `count` messages sent and their turns ended (.in and .out
// arrive on two streams, so both are waited for).
function turnsShown(count) {
    const shown = (selector) => document.querySelectorAll('#pg-messages > li' + selector).length;
    return shown('.pg-msg.user') >= count && shown('.pg-turn-end') >= count;
}

// The raw records of a pane (`in` or `out`), as shown.
async function rawRecords(page, io) {
    return page.$$eval(`#pg-raw-${io} > li.pg-record`, (items) => items.map((li) => li.textContent));
}

// Starts a session of the default task in PLAYGROUND_ENV from the form.
async function startSession(page) {
    await goto(page, '/dashboard/playground');
    await page.selectOption('form#playground-start select[name=env]', PLAYGROUND_ENV);
    const task = await page.inputValue('form#playground-start input[name=task]');
    assert(task === 'echo-agent', `the default task is echo-agent, not ${task}`);
    const list = await page.getAttribute('form#playground-start input[name=task]', 'list');
    assert(list === `tasks-${PLAYGROUND_ENV}`, `the task suggestions are the environment's: ${list}`);
    await submitForm(page, 'form#playground-start');
    assert(/^\/dashboard\/playground\/session_/.test(pathname(page)), `landed on ${page.url()}`);
    await expectSelector(page, READY, { timeout: LIVE_TIMEOUT });
    const empty = await conversation(page);
    assert(empty.bubbles.length === 0, `a new session has no messages: ${JSON.stringify(empty)}`);
}

// Sends `text` and waits for turn `n` (1-based) to end with the echo of it;
// checks the answering indicator showed while the agent answered.
async function turn(page, n, text) {
    await page.evaluate(() => {
        const root = document.getElementById('playground');
        window.pgBusySeen = false;
        new MutationObserver(() => {
            if (root.dataset.busy === 'true') {
                window.pgBusySeen = true;
            }
        }).observe(root, { attributes: true, attributeFilter: ['data-busy'] });
    });
    await page.fill('#pg-text', text);
    await page.click('#pg-send');
    try {
        await page.waitForFunction(turnsShown, n, { timeout: REPLY_TIMEOUT });
    } catch {
        throw new Error(`turn ${n} did not end within ${REPLY_TIMEOUT / 1000} s: ${JSON.stringify(await conversation(page))}`);
    }
    const c = await conversation(page);
    const user = c.bubbles.filter((b) => b.role === 'user');
    const agent = c.bubbles.filter((b) => b.role === 'assistant');
    assert(user.length === n && user[n - 1].text === text, `user bubble ${n}: ${JSON.stringify(c)}`);
    assert(agent.length === n, `assistant bubble ${n}: ${JSON.stringify(c)}`);
    assert(agent[n - 1].text === `echo: ${text}` && agent[n - 1].done, `the reply ${n}: ${JSON.stringify(agent)}`);
    assert(await page.evaluate(() => window.pgBusySeen), 'the answering indicator showed');
    assert(await page.isHidden('#pg-thinking'), 'the indicator is gone once the turn ended');
    assert((await page.inputValue('#pg-text')) === '', 'the composer was cleared');
}

// The reply arrived as several deltas, and both raw panes show the records.
async function rawPanesShow(page, texts) {
    const ins = await rawRecords(page, 'in');
    const outs = await rawRecords(page, 'out');
    assert(ins.length === texts.length, `${texts.length} .in records, not ${ins.length}`);
    texts.forEach((text, i) => {
        assert(ins[i].includes('"kind":"message"') && ins[i].includes(text), `.in #${i}: ${ins[i]}`);
    });
    const deltas = outs.filter((r) => r.includes('"type":"text-delta"')).length;
    const words = texts.reduce((sum, t) => sum + `echo: ${t}`.split(' ').length, 0);
    assert(deltas === words, `every delta shown once (${deltas} of ${words})`);
    const ends = outs.filter((r) => r.includes('trigger-control: turn-complete')).length;
    assert(ends === texts.length, `${texts.length} turn-complete records, not ${ends}`);
}

const TURNS = ['hello agent', 'how are you today'];
const EXPECTED = TURNS.flatMap((t) => [
    { role: 'user', text: t, done: false },
    { role: 'assistant', text: `echo: ${t}`, done: true },
]);

// The whole conversation is shown in order after a reload or reopen.
async function historyShown(page) {
    await expectSelector(page, READY, { timeout: LIVE_TIMEOUT });
    try {
        await page.waitForFunction(turnsShown, TURNS.length, { timeout: LIVE_TIMEOUT });
    } catch {
        throw new Error(`the history did not show: ${JSON.stringify(await conversation(page))}`);
    }
    const c = await conversation(page);
    assert(JSON.stringify(c.bubbles) === JSON.stringify(EXPECTED), `the history in order: ${JSON.stringify(c.bubbles)}`);
    assert(c.turnEnds === TURNS.length, `${TURNS.length} turn ends, not ${c.turnEnds}`);
    assert(await page.isHidden('#pg-thinking'), 'nothing is being answered');
    await rawPanesShow(page, TURNS);
}

const browser = await start(WATCHDOG);

// ---- 1280 px ----

const desk = await newPage(browser, 'desktop', DESKTOP);
let sessionPath = '';

await check('desktop: an admin starts a session in the playground', desk, async () => {
    await logIn(desk, ADMIN);
    await goto(desk, '/dashboard/playground');
    await shot(desk, 'desktop start form');
    await startSession(desk);
    assert(await desk.isHidden('#pg-stop'), 'no Stop button while nothing is answered');
    sessionPath = pathname(desk);
});

await check('desktop: the first reply streams in', desk, async () => {
    await turn(desk, 1, TURNS[0]);
    await rawPanesShow(desk, TURNS.slice(0, 1));
});

await check('desktop: a second turn, the raw panes beside the conversation', desk, async () => {
    await turn(desk, 2, TURNS[1]);
    await rawPanesShow(desk, TURNS);
    const chat = await desk.locator('#pg-chat').boundingBox();
    const raw = await desk.locator('#pg-in').boundingBox();
    assert(chat && raw && raw.x >= chat.x + chat.width, `side by side: ${JSON.stringify({ chat, raw })}`);
    assert(await desk.isVisible('#pg-out'), 'the .out pane shows');
    await assertNoSidewaysScroll(desk);
});

await check('desktop: a reload shows the history', desk, async () => {
    await desk.reload();
    await historyShown(desk);
});

await check('desktop: reopening by external id shows the history', desk, async () => {
    const external = ((await desk.textContent('#pg-external-id')) || '').trim();
    assert(external.startsWith('playground-'), `an external id: ${external}`);
    await goto(desk, '/dashboard/playground');
    await desk.selectOption('form#playground-start select[name=env]', PLAYGROUND_ENV);
    await desk.fill('form#playground-start input[name=reopen]', external);
    await submitForm(desk, 'form#playground-start');
    assert(pathname(desk) === sessionPath, `reopened ${sessionPath}, not ${pathname(desk)}`);
    await historyShown(desk);
});

await check('desktop: Stop cuts a slow reply short', desk, async () => {
    // Another client of the session (with the page's own token) sends a
    // message whose metadata paces the echo agent's deltas (its test seam),
    // so the page has a turn in progress to stop.
    const long = 'one two three four five six seven eight nine ten eleven twelve';
    const sent = await desk.evaluate(async (text) => {
        const cfg = document.getElementById('playground').dataset;
        const res = await fetch(cfg.inUrl + '/append', {
            method: 'POST',
            headers: { Authorization: 'Bearer ' + cfg.token, 'Content-Type': 'application/json', 'X-Part-Id': 'paced-1' },
            body: JSON.stringify({
                kind: 'message',
                payload: {
                    message: { id: 'paced', role: 'user', parts: [{ type: 'text', text }] },
                    chatId: cfg.chatId,
                    trigger: 'submit-message',
                    // 2.5 s a word: the echo agent's pacing cap (30 s a
                    // turn) is spent over the whole answer, so the click on
                    // Stop has half a minute to land mid-turn.
                    metadata: { echoDelayMs: 2500 },
                },
            }),
        });
        return res.status;
    }, long);
    assert(sent === 200, `the paced message was appended (${sent})`);
    try {
        await desk.waitForFunction(
            () => {
                const replies = document.querySelectorAll('#pg-messages > li.pg-msg.assistant .pg-text');
                return replies.length === 3 && replies[2].textContent.length > 0;
            },
            null,
            { timeout: REPLY_TIMEOUT },
        );
    } catch {
        throw new Error(`the third reply did not start: ${JSON.stringify(await conversation(desk))}`);
    }
    assert(await desk.isVisible('#pg-thinking'), 'the answering indicator shows during the turn');
    assert(await desk.isVisible('#pg-stop'), 'a Stop button during the turn');
    await desk.click('#pg-stop');
    await desk.waitForFunction(turnsShown, 3, { timeout: REPLY_TIMEOUT });
    const c = await conversation(desk);
    const reply = c.bubbles.filter((b) => b.role === 'assistant')[2].text;
    const full = `echo: ${long}`;
    assert(full.startsWith(reply) && reply.length < full.length, `a prefix of the answer: ${reply}`);
    assert((await desk.locator('#pg-messages > li.pg-stop-note').count()) === 1, 'the stop is shown');
    assert((await desk.locator('#pg-messages > li.pg-msg.assistant .pg-cut').count()) === 1, 'the reply is marked stopped');
    assert(await desk.isHidden('#pg-thinking'), 'the indicator is gone');
    assert(await desk.isHidden('#pg-stop'), 'the Stop button is gone');
});

// ---- 390 px ----

const phone = await newPage(browser, 'phone', PHONE);

await check('phone: the start form fits and starts a session', phone, async () => {
    await logIn(phone, ADMIN);
    await goto(phone, '/dashboard/playground');
    await assertNoSidewaysScroll(phone);
    await shot(phone, 'phone start form');
    await startSession(phone);
    assert(pathname(phone) !== sessionPath, 'a new session');
    assert(await phone.isVisible('[role="tab"][data-tab="pg-in"]'), 'tabs for the panes');
    assert(await phone.isHidden('#pg-in'), 'one pane at a time');
    await assertNoSidewaysScroll(phone);
});

await check('phone: a two-turn conversation', phone, async () => {
    await turn(phone, 1, TURNS[0]);
    await turn(phone, 2, TURNS[1]);
    const box = await phone.locator('#pg-composer').boundingBox();
    assert(box && box.x >= 0 && box.x + box.width <= PHONE.width, `the composer fits: ${JSON.stringify(box)}`);
    await assertNoSidewaysScroll(phone);
});

await check('phone: the raw .in and .out tabs show the records', phone, async () => {
    await phone.click('[role="tab"][data-tab="pg-in"]');
    assert(await phone.isVisible('#pg-in') && (await phone.isHidden('#pg-chat')), 'the .in tab');
    await assertNoSidewaysScroll(phone);
    // The keyboard moves between tabs too.
    await phone.press('[role="tab"][data-tab="pg-in"]', 'ArrowRight');
    assert(await phone.isVisible('#pg-out') && (await phone.isHidden('#pg-in')), 'the .out tab');
    const focused = await phone.evaluate(() => document.activeElement.dataset.tab);
    assert(focused === 'pg-out', `the .out tab has the focus, not ${focused}`);
    await assertNoSidewaysScroll(phone);
    await rawPanesShow(phone, TURNS);
});

await browser.close();
await finish();
