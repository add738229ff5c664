// The parts every browser script shares: the stdout protocol the Rust tests
// parse, checks with a screenshot after each, Chromium's launch, and the
// page helpers (navigation, forms, sign-in). A script imports what it uses
// and calls `start()` first and `finish()` last.
//
// stdout protocol:
//   ok - <check name>
//   not ok - <check name>: <error>
//   <P> passed, <F> failed   (last line; exit code 1 if F > 0)
// Diagnostics (browser console errors, screenshot paths) go to stderr.
//
// A page's uncaught exception (`pageerror`) or console error fails the run:
// the check during which it arrived fails with it, and one that arrives
// outside any check is reported as `not ok - page errors` before the tally.
// One console error is expected and allowed: Chromium's "Failed to load
// resource: the server responded with a status of N" for the page's own
// document, when a script opens a 401, 403 or 404 page on purpose (the
// check that opens it asserts the status, or the page's error). The same
// line for any other resource (a script, a stylesheet, an htmx request)
// still fails. Console warnings are only logged.

import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export const TIMEOUT = 5_000; // default for every wait
export const NAV_TIMEOUT = 10_000;
const SERVER_WAIT = 10_000; // for the login page to answer 200 at start

/// The phone-sized viewport every page must be usable at, and the desktop one.
export const DESKTOP = { width: 1280, height: 900 };
export const PHONE = { width: 390, height: 844 };

// ---- output ----

let passed = 0;
let failed = 0;

export function emit(line) {
    return new Promise((resolve) => process.stdout.write(line + '\n', () => resolve()));
}

// Capped: a caller that reads stderr only after stdout ends must not see the
// pipe fill up (and this process block on it) because a page logs in a loop.
const DIAG_LINES = 100;
let diagLines = 0;

export function diag(message) {
    diagLines++;
    if (diagLines > DIAG_LINES) {
        return;
    }
    const line = diagLines === DIAG_LINES ? '(more diagnostics left out)' : String(message).slice(0, 300);
    process.stderr.write('# ' + line + '\n');
}

// One line, no terminal colours, no Playwright call log.
export function describe(err) {
    const text =
        String((err && err.message) || err)
            .replace(/\u001b\[[0-9;]*m/g, '')
            .split('\n')
            .map((l) => l.trim())
            .filter(Boolean)[0] || 'unknown error';
    return text.length > 300 ? text.slice(0, 297) + '...' : text;
}

// ---- errors the pages raised ----

/// Uncaught exceptions and console errors of every page, in arrival order.
const pageProblems = [];
/// How many of them a check (or finish) has reported already.
let problemsReported = 0;

/// The problems not reported yet, marked reported.
function takeProblems() {
    const fresh = pageProblems.slice(problemsReported);
    problemsReported = pageProblems.length;
    return fresh;
}

function problemSummary(problems) {
    const more = problems.length > 1 ? ` (and ${problems.length - 1} more)` : '';
    return `${problems[0]}${more}`;
}

/// Is this console message Chromium's note that the page's own document
/// answered an error status? (The one console error allowed: see the top.)
function isDocumentStatus(page, msg) {
    if (!/^Failed to load resource: the server responded with a status of 4\d\d\b/.test(msg.text())) {
        return false;
    }
    const where = msg.location()?.url || '';
    return where !== '' && where === page.url();
}

export async function finish() {
    const late = takeProblems();
    if (late.length > 0) {
        failed++;
        await emit(`not ok - page errors: ${problemSummary(late)}`);
    }
    await emit(`${passed} passed, ${failed} failed`);
    process.exitCode = failed > 0 ? 1 : 0;
}

/// Reports a failure outside any check (a script's own setup) and goes on.
export async function fail(what, err) {
    failed++;
    await emit(`not ok - ${what}: ${describe(err)}`);
}

/// Reports a failure outside any check (setup) and ends the run.
export async function abort(what, err) {
    await fail(what, err);
    await finish();
    process.exit();
}

// ---- environment ----

/// The named variables, or the run ends with a failure naming the missing.
export async function requireEnv(names) {
    const missing = names.filter((name) => !process.env[name]);
    if (missing.length > 0) {
        await abort('environment', `missing ${missing.join(', ')}`);
    }
    return Object.fromEntries(names.map((name) => [name, process.env[name]]));
}

export const BASE = (process.env.DASHBOARD_URL || '').replace(/\/+$/, '');
const SCREENSHOT_DIR = process.env.SCREENSHOT_DIR || path.join(os.tmpdir(), 'sessiond-dashboard-screenshots');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
/// Prefix of this script's screenshot names, so two scripts can share a folder.
const SHOT_PREFIX = process.env.SCREENSHOT_PREFIX || '';

// ---- checks and screenshots ----

let shotNumber = 0;

export function slug(name) {
    return name
        .toLowerCase()
        .replace(/[^a-z0-9]+/g, '-')
        .replace(/^-+|-+$/g, '');
}

/// Full-page screenshot [prefix]NN-<name>.png; a failed screenshot fails no check.
export async function shot(page, name) {
    shotNumber++;
    const file = path.join(SCREENSHOT_DIR, `${SHOT_PREFIX}${String(shotNumber).padStart(2, '0')}-${slug(name)}.png`);
    try {
        await page.screenshot({ path: file, fullPage: true, timeout: TIMEOUT });
        diag(`screenshot ${file}`);
    } catch (err) {
        diag(`screenshot ${file} failed: ${describe(err)}`);
    }
}

/// Runs one check, reports it, and screenshots `page` afterwards (pass or fail).
export async function check(name, page, fn) {
    try {
        await fn();
        const problems = takeProblems();
        if (problems.length > 0) {
            throw new Error(problemSummary(problems));
        }
        passed++;
        await emit(`ok - ${name}`);
    } catch (err) {
        failed++;
        await emit(`not ok - ${name}: ${describe(err)}`);
    }
    if (page) {
        await shot(page, name);
    }
}

export function assert(condition, message) {
    if (!condition) {
        throw new Error(message);
    }
}

// ---- the browser ----

async function waitForServer() {
    const deadline = Date.now() + SERVER_WAIT;
    let last = 'no answer';
    while (Date.now() < deadline) {
        try {
            const res = await fetch(BASE + '/dashboard/login', {
                redirect: 'manual',
                signal: AbortSignal.timeout(2_000),
            });
            await res.arrayBuffer();
            if (res.status === 200) {
                return;
            }
            last = `status ${res.status}`;
        } catch (err) {
            last = describe(err.cause || err);
        }
        await new Promise((resolve) => setTimeout(resolve, 200)); // retry interval
    }
    throw new Error(`GET ${BASE}/dashboard/login did not answer 200 within ${SERVER_WAIT / 1000} s (${last})`);
}

/// Waits for the server, launches Chromium and arms a watchdog of `watchdogMs`
/// (shorter than the Rust test's own timeout, so a hang is reported by name).
export async function start(watchdogMs) {
    if (!BASE) {
        await abort('environment', 'missing DASHBOARD_URL');
    }
    mkdirSync(SCREENSHOT_DIR, { recursive: true });
    const watchdog = setTimeout(async () => {
        failed++;
        await emit(`not ok - watchdog: the run took longer than ${watchdogMs / 1000} s`);
        await finish();
        process.exit();
    }, watchdogMs);
    watchdog.unref();
    let browser;
    try {
        await waitForServer();
        browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox'] });
    } catch (err) {
        if (browser) {
            await browser.close().catch(() => {});
        }
        await abort('start', err);
    }
    return browser;
}

/// A page in a fresh context (its own cookies) whose uncaught exceptions and
/// console errors fail the run (see the top), logging its console warnings,
/// and accepting every confirm() (the operator says yes).
export async function newPage(browser, who, viewport = DESKTOP) {
    const context = await browser.newContext({ viewport });
    context.setDefaultTimeout(TIMEOUT);
    context.setDefaultNavigationTimeout(NAV_TIMEOUT);
    const page = await context.newPage();
    page.on('console', (msg) => {
        if (msg.type() !== 'error' && msg.type() !== 'warning') {
            return;
        }
        const where = msg.location()?.url ? ` (${msg.location().url})` : '';
        diag(`${who} console ${msg.type()}: ${msg.text()}${where}`);
        if (msg.type() === 'error' && !isDocumentStatus(page, msg)) {
            pageProblems.push(`${who} console error: ${msg.text().slice(0, 200)}${where}`);
        }
    });
    page.on('pageerror', (err) => {
        diag(`${who} page error: ${describe(err)}`);
        pageProblems.push(`${who} page error: ${describe(err)}`);
    });
    page.on('dialog', (dialog) => {
        diag(`${who} ${dialog.type()} accepted: ${dialog.message()}`);
        dialog.accept().catch(() => {});
    });
    return page;
}

// ---- page helpers ----

export function pathname(page) {
    return new URL(page.url()).pathname;
}

export async function goto(page, urlPath) {
    const res = await page.goto(BASE + urlPath);
    assert(res, `no response for ${urlPath}`);
    assert(res.status() < 400, `GET ${urlPath} answered ${res.status()}`);
    return res;
}

/// waitForSelector with an error that names the selector and the page.
export async function expectSelector(page, selector, options = {}) {
    try {
        return await page.waitForSelector(selector, options);
    } catch {
        const seconds = (options.timeout ?? TIMEOUT) / 1000;
        throw new Error(`no ${selector} on ${page.url()} within ${seconds} s`);
    }
}

export async function headingOf(page) {
    const h1 = await expectSelector(page, 'h1');
    return ((await h1.textContent()) || '').trim();
}

/// Submits a form the way a click on its submit button would (submit event,
/// validation) and waits for the page that comes back.
export async function submitForm(page, selector) {
    const form = page.locator(selector).first();
    await form.waitFor({ state: 'attached' });
    const loaded = page.waitForEvent('load', { timeout: NAV_TIMEOUT });
    await form.evaluate((f) => f.requestSubmit());
    await loaded;
}

export async function fillLogin(page, email, password) {
    await page.fill('form#login input[name=email]', email);
    await page.fill('form#login input[name=password]', password);
    await submitForm(page, 'form#login');
}

/// Signs `who` ({ email, password }) in; fails unless it lands on the sessions list.
export async function logIn(page, who) {
    await goto(page, '/dashboard/login');
    await fillLogin(page, who.email, who.password);
    if (!pathname(page).endsWith('/dashboard/sessions')) {
        const error = await page.locator('.error').first().textContent({ timeout: 500 }).catch(() => null);
        throw new Error(
            `logging in as ${who.email} landed on ${page.url()}` + (error ? ` (.error: ${error.trim()})` : ''),
        );
    }
}

/// Fails when the page is wider than its viewport (a phone would scroll the
/// whole page sideways); wide tables must scroll inside their own box.
export async function assertNoSidewaysScroll(page) {
    const { scroll, width } = await page.evaluate(() => ({
        scroll: document.documentElement.scrollWidth,
        width: window.innerWidth,
    }));
    assert(scroll <= width, `${pathname(page)} is ${scroll} px wide in a ${width} px window`);
}

/// Fails unless `selector`'s first match, scrolled into view, is visible, at
/// least 40 px each way (a thumb hits it) and inside the window's width.
export async function assertTappable(page, selector) {
    const box = await visibleBox(page, selector);
    assert(
        box.width >= 40 && box.height >= 40,
        `${selector} is ${Math.round(box.width)}x${Math.round(box.height)} px on ${pathname(page)}, under 40 px`,
    );
}

/// Fails unless `selector`'s first match, scrolled into view, is visible,
/// inside the window's width, and does not scroll sideways itself (its text
/// wraps: JSON, ids, keys).
export async function assertFits(page, selector) {
    await visibleBox(page, selector);
    const { scroll, client } = await page
        .locator(selector)
        .first()
        .evaluate((el) => ({ scroll: el.scrollWidth, client: el.clientWidth }));
    assert(scroll <= client + 1, `${selector} on ${pathname(page)} holds ${scroll} px in ${client} px`);
}

async function visibleBox(page, selector) {
    const el = page.locator(selector).first();
    try {
        await el.waitFor({ state: 'visible' });
    } catch {
        throw new Error(`${selector} is not visible on ${page.url()}`);
    }
    await el.scrollIntoViewIfNeeded();
    const box = await el.boundingBox();
    assert(box, `${selector} has no box on ${pathname(page)}`);
    const width = page.viewportSize().width;
    assert(
        box.x >= 0 && box.x + box.width <= width + 0.5,
        `${selector} spans ${Math.round(box.x)}-${Math.round(box.x + box.width)} px of a ${width} px window on ${pathname(page)}`,
    );
    return box;
}
