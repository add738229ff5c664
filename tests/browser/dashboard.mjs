// Drives the operator dashboard in Debian's headless Chromium (playwright-core
// talks to it over CDP; no browser download, no ChromeDriver).
//
// Run by the Rust integration test `dashboard_browser`, which starts the
// server, seeds data and passes the environment below. See docs/dashboard.md and docs/testing.md.
//
// stdout: harness.mjs's protocol, plus one line for the Rust test to act on:
//   waiting-for-out          (check 6: append a live-marker-... record now)
//
// Jobs (PROBE_JOB, STUCK_JOB): the Rust test submits two probe jobs (the
// job kind that fails on purpose) and waits until both have failed every
// attempt. The admin retries PROBE_JOB from its page (its next attempt
// succeeds); STUCK_JOB stays failed, for the viewer's look at a job page.

import {
    BASE,
    DESKTOP,
    PHONE,
    TIMEOUT,
    NAV_TIMEOUT,
    assert,
    assertFits,
    assertNoSidewaysScroll,
    assertTappable,
    check,
    emit,
    expectSelector,
    fail,
    fillLogin,
    finish,
    goto,
    headingOf,
    logIn,
    newPage,
    pathname,
    requireEnv,
    shot,
    start,
    submitForm,
} from './harness.mjs';

const LIVE_READY_TIMEOUT = 10_000; // the SSE connection to open
const OUT_TIMEOUT = 15_000; // the appended .out record to show up
const JOB_TIMEOUT = 15_000; // a retried job to reach succeeded
const JOB_POLL = 500; // reload interval while waiting for it
const WATCHDOG = 110_000; // the whole run, should anything hang (the Rust test gives it 120 s)

await requireEnv([
    'DASHBOARD_URL',
    'ADMIN_EMAIL',
    'ADMIN_PASSWORD',
    'VIEWER_EMAIL',
    'VIEWER_PASSWORD',
    'FILTER_TAG',
    'FILTER_MATCHES',
    'LIVE_SESSION',
    'PROBE_JOB',
    'STUCK_JOB',
    'HANDOFF_SESSION',
    'HANDOFF_KEEP',
    'ROTATE_ENV',
]);

const ADMIN = { email: process.env.ADMIN_EMAIL, password: process.env.ADMIN_PASSWORD };
const VIEWER = { email: process.env.VIEWER_EMAIL, password: process.env.VIEWER_PASSWORD };
const FILTER_TAG = process.env.FILTER_TAG;
const FILTER_MATCHES = Number.parseInt(process.env.FILTER_MATCHES, 10);
const LIVE_SESSION = process.env.LIVE_SESSION;
const PROBE_JOB = process.env.PROBE_JOB;
const STUCK_JOB = process.env.STUCK_JOB;
// Two failed handoffs: the admin retries the first; the second stays listed.
const HANDOFF_SESSION = process.env.HANDOFF_SESSION;
const HANDOFF_KEEP = process.env.HANDOFF_KEEP;
// Operations pages: the admin rotates ROTATE_ENV's key (an environment no
// other check uses) and starts a full backfill (replication is off).
const ROTATE_ENV = process.env.ROTATE_ENV;
const BACKFILL_TIMEOUT = 20_000; // a started backfill to complete

/// What the dashboard shows of a secret key: its first 12 characters.
const keyHint = (key) => `${[...key].slice(0, 12).join('')}…`;

const SESSION_ROWS = 'table#sessions tbody tr[data-session-id]';
const RUN_ROWS = 'table#runs tbody tr[data-run-id]';
const RUN_LINKS = RUN_ROWS + ' a[href^="/dashboard/runs/"]';
const handoffRow = (session) => `table#handoffs tbody tr[data-session-id="${session}"]`;
const LOGOUT_FORM = 'form[action="/dashboard/logout"]';
const sessionPath = '/dashboard/sessions/' + encodeURIComponent(LIVE_SESSION);
const FAILED_PROBES = '/dashboard/jobs?kind=probe&status=failed';
const probePath = '/dashboard/jobs/' + encodeURIComponent(PROBE_JOB);

// ---- helpers ----

async function sessionIds(page) {
    return page.$$eval(SESSION_ROWS, (rows) => rows.map((r) => r.getAttribute('data-session-id')));
}

async function waitForRowCount(page, expected) {
    try {
        await page.waitForFunction(
            ({ selector, n }) => document.querySelectorAll(selector).length === n,
            { selector: SESSION_ROWS, n: expected },
            { timeout: TIMEOUT },
        );
    } catch {
        const actual = await page.locator(SESSION_ROWS).count();
        throw new Error(`expected ${expected} rows in table#sessions, found ${actual}`);
    }
}

async function assertNoActionButtons(page, where) {
    const count = await page.locator('button[data-action]').count();
    assert(count === 0, `${where} has ${count} button[data-action] element(s) for a viewer`);
}

// ---- the tour: every page at 1280 px and at 390 px ----

// One entry a page, in one list (pages added later go here too): where it
// is (`path`, a function of the page when it depends on the data, or `open`
// when an action leads there), the status it answers, and `usable`: what a
// phone must be able to do there besides not scrolling sideways. Each entry
// is one check, with the screenshots tour-<name>-1280 and tour-<name>-390.
const TOUR = [
    {
        name: 'login',
        path: '/dashboard/login',
        signedOut: true,
        usable: async (p) => {
            await assertTappable(p, 'form#login input[name=email]');
            await assertTappable(p, 'form#login button[type=submit]');
        },
    },
    {
        name: 'nav',
        path: '/dashboard/runs',
        desktop: async (p) => {
            assert(!(await p.locator('nav .nav-toggle').isVisible()), 'the Menu button shows at 1280 px');
            await expectSelector(p, 'nav a[href="/dashboard/playground"]', { state: 'visible' });
            // Either side of the width where the bar folds, and a tablet's:
            // the bar fits (folded or not), and the runs table scrolls in its box.
            try {
                for (const width of [1181, 1180, 768]) {
                    await p.setViewportSize({ width, height: DESKTOP.height });
                    await assertNoSidewaysScroll(p);
                }
                await shot(p, 'tour nav 768');
            } finally {
                await p.setViewportSize(DESKTOP);
            }
        },
        usable: async (p) => {
            // Folded behind the Menu button; opened, every link is a row.
            const runs = p.locator('nav a[href="/dashboard/runs"]');
            assert(!(await runs.isVisible()), 'the links show before the menu is opened');
            await assertTappable(p, 'nav .nav-toggle');
            await p.click('nav .nav-toggle');
            await assertTappable(p, 'nav a[href="/dashboard/overview"]');
            await assertTappable(p, 'nav a[href="/dashboard/playground"]');
            await p.click('nav .nav-menu summary');
            await assertTappable(p, 'nav a[href="/dashboard/environments"]');
            await assertTappable(p, 'nav a[href="/dashboard/audit"]');
            await assertTappable(p, 'nav form[action="/dashboard/logout"] button');
        },
    },
    {
        name: 'overview',
        path: '/dashboard/overview',
        usable: async (p) => {
            await assertTappable(p, 'form#overview-filters button[type=submit]');
            await assertFits(p, '#chart-sessions');
            await assertFits(p, '#chart-failures');
        },
    },
    {
        name: 'sessions',
        path: '/dashboard/sessions',
        usable: async (p) => {
            await assertTappable(p, 'form#filters input[name=tag]');
            await assertTappable(p, 'form#filters button[type=submit]');
            await assertTappable(p, 'form#filters label.toggle');
            await assertTappable(p, `${SESSION_ROWS} a`);
        },
    },
    {
        name: 'session',
        path: sessionPath,
        usable: async (p) => {
            await assertTappable(p, 'button[data-action="close"]');
            await assertFits(p, '#out-tail');
        },
    },
    {
        name: 'runs',
        path: '/dashboard/runs',
        usable: async (p) => {
            await assertTappable(p, 'form#filters button[type=submit]');
            await assertTappable(p, RUN_LINKS);
        },
    },
    {
        name: 'run',
        path: async (p) => {
            await goto(p, '/dashboard/runs');
            return p.locator(RUN_LINKS).first().getAttribute('href');
        },
        usable: (p) => assertFits(p, 'pre#run-payload'),
    },
    {
        name: 'jobs',
        path: FAILED_PROBES,
        usable: async (p) => {
            await assertTappable(p, 'form#filters button[type=submit]');
            await assertTappable(p, `table#jobs tr[data-job-id="${STUCK_JOB}"] label.tick`);
            await assertTappable(p, 'button[data-action="retry-selected"]');
        },
    },
    {
        name: 'job',
        path: '/dashboard/jobs/' + encodeURIComponent(STUCK_JOB),
        usable: async (p) => {
            await assertTappable(p, 'button[data-action="retry"]');
            await assertFits(p, 'table#attempts');
        },
    },
    {
        name: 'jobs-retry',
        path: FAILED_PROBES.replace('/dashboard/jobs?', '/dashboard/jobs/retry-matching?'),
        usable: (p) => assertTappable(p, 'button[data-action="retry-matching-confirm"]'),
    },
    {
        name: 'handoffs',
        path: '/dashboard/handoffs',
        usable: (p) => assertTappable(p, handoffRow(HANDOFF_KEEP) + ' button[data-action="retry"]'),
    },
    {
        name: 'schedules',
        path: '/dashboard/schedules',
        usable: async (p) => {
            await assertFits(p, 'table#schedules tr[data-schedule="run-sweep"]');
            await assertTappable(p, 'table#schedules tr[data-schedule="run-sweep"] ul.last-runs a');
        },
    },
    {
        name: 'replication',
        path: '/dashboard/replication',
        usable: async (p) => {
            await assertTappable(p, 'button[data-action="start-backfill"]');
            await assertFits(p, 'table#backfills');
        },
    },
    {
        name: 'environments',
        path: '/dashboard/environments',
        usable: (p) => assertTappable(p, `table#environments tr[data-env-id="${ROTATE_ENV}"] button[data-action="rotate-key"]`),
    },
    {
        name: 'key-rotated',
        // Rotates ROTATE_ENV's key once more (confirm() says yes).
        open: async (p) => {
            await goto(p, '/dashboard/environments');
            const loaded = p.waitForEvent('load', { timeout: NAV_TIMEOUT });
            await p.click(`table#environments tr[data-env-id="${ROTATE_ENV}"] button[data-action="rotate-key"]`);
            await loaded;
            await expectSelector(p, 'pre#new-key');
        },
        usable: (p) => assertFits(p, 'pre#new-key'),
    },
    {
        name: 'playground',
        path: '/dashboard/playground',
        usable: async (p) => {
            await assertTappable(p, 'form#playground-start input[name=task]');
            await assertTappable(p, 'button[data-action="playground-start"]');
        },
    },
    {
        name: 'audit',
        path: '/dashboard/audit',
        usable: (p) => assertFits(p, 'table#audit'),
    },
    {
        name: 'error',
        path: '/dashboard/sessions/session_nosuchsession',
        status: 404,
        usable: async (p) => {
            await assertFits(p, 'p.error');
            await assertTappable(p, 'p.back a');
        },
    },
];

/// Shows `entry` on `page`: its path (answering its status) or its action.
async function visit(page, entry) {
    if (entry.open) {
        await entry.open(page);
    } else {
        const where = typeof entry.path === 'function' ? await entry.path(page) : entry.path;
        const res = await page.goto(BASE + where);
        const status = entry.status ?? 200;
        assert(res && res.status() === status, `GET ${where} answered ${res && res.status()}, not ${status}`);
    }
    await expectSelector(page, 'h1');
}

/// Each tour entry at both widths: admin pages signed in as the admin, the
/// rest in contexts without a cookie.
async function tour() {
    const pages = {};
    for (const [width, viewport] of [
        ['1280', DESKTOP],
        ['390', PHONE],
    ]) {
        const admin = await newPage(browser, `admin ${width}`, viewport);
        await logIn(admin, ADMIN);
        pages[width] = { admin, anon: await newPage(browser, `signed out ${width}`, viewport) };
    }
    for (const entry of TOUR) {
        await check(`tour ${entry.name}`, null, async () => {
            for (const width of ['1280', '390']) {
                const page = entry.signedOut ? pages[width].anon : pages[width].admin;
                await visit(page, entry);
                try {
                    await assertNoSidewaysScroll(page);
                    if (width === '1280') {
                        await entry.desktop?.(page);
                    } else {
                        await (entry.usable ?? ((p) => assertFits(p, 'h1')))(page);
                    }
                } finally {
                    await shot(page, `tour ${entry.name} ${width}`);
                }
            }
        });
    }
    for (const { admin, anon } of Object.values(pages)) {
        await admin.context().close();
        await anon.context().close();
    }
}

// ---- the run ----

const browser = await start(WATCHDOG);

try {
    const admin = await newPage(browser, 'admin');

    await check('login page', admin, async () => {
        const res = await goto(admin, '/dashboard/login');
        assert(res.status() === 200, `GET /dashboard/login answered ${res.status()}`);
        const headers = await res.allHeaders();
        const csp = headers['content-security-policy'];
        assert(csp, 'no content-security-policy header');
        assert(csp.includes("default-src 'self'"), `content-security-policy lacks default-src 'self': ${csp}`);
        await expectSelector(admin, 'form#login');
        await expectSelector(admin, 'form#login input[name=email]');
        await expectSelector(admin, 'form#login input[name=password]');
        const csrf = await expectSelector(admin, 'form#login input[name=csrf]', { state: 'attached' });
        const type = await csrf.getAttribute('type');
        assert(type === 'hidden', `input[name=csrf] has type ${type}, not hidden`);
        const value = await csrf.getAttribute('value');
        assert(value, 'input[name=csrf] has no value');
    });

    await check('wrong password is refused', admin, async () => {
        await goto(admin, '/dashboard/login');
        await fillLogin(admin, ADMIN.email, ADMIN.password + '-wrong');
        assert(pathname(admin) === '/dashboard/login', `landed on ${admin.url()}`);
        await expectSelector(admin, '.error');
        await expectSelector(admin, 'form#login');
    });

    await check('admin logs in', admin, async () => {
        await logIn(admin, ADMIN);
        await expectSelector(admin, 'nav a[href="/dashboard/sessions"]', { state: 'attached' });
        await expectSelector(admin, 'nav a[href="/dashboard/audit"]', { state: 'attached' });
        await expectSelector(admin, LOGOUT_FORM, { state: 'attached' });
    });

    await check('sessions list', admin, async () => {
        if (pathname(admin) !== '/dashboard/sessions') {
            await goto(admin, '/dashboard/sessions');
        }
        await expectSelector(admin, SESSION_ROWS);
        const count = await admin.locator('time[datetime]').count();
        assert(count > 0, 'no time[datetime] element on the page');
        // dashboard.js gives every <time> a title; wait for it to have run.
        try {
            await admin.waitForFunction(() =>
                Array.from(document.querySelectorAll('time[datetime]')).every((t) => t.title.trim() !== ''),
            );
        } catch {
            throw new Error('time[datetime] elements have no title (did dashboard.js run?)');
        }
        const raw = await admin.$$eval('time[datetime]', (times) =>
            times
                .filter((t) => t.textContent.trim() === t.getAttribute('datetime').trim())
                .map((t) => t.getAttribute('datetime')),
        );
        assert(raw.length === 0, `time element still shows its raw datetime: ${raw[0]}`);
    });

    await check('filter sessions by tag', admin, async () => {
        assert(Number.isInteger(FILTER_MATCHES), `FILTER_MATCHES is not a number: ${process.env.FILTER_MATCHES}`);
        if (pathname(admin) !== '/dashboard/sessions') {
            await goto(admin, '/dashboard/sessions');
        }
        await admin.fill('form#filters input[name=tag]', FILTER_TAG);
        await admin.locator('form#filters').evaluate((f) => f.requestSubmit());
        // Plain GET form or htmx with hx-push-url: either way the URL says it.
        await admin.waitForURL((url) => url.searchParams.get('tag') === FILTER_TAG, { timeout: NAV_TIMEOUT });
        await waitForRowCount(admin, FILTER_MATCHES);
        const before = await sessionIds(admin);

        await admin.reload();
        assert(
            new URL(admin.url()).searchParams.get('tag') === FILTER_TAG,
            `after reload the URL lost the filter: ${admin.url()}`,
        );
        await waitForRowCount(admin, FILTER_MATCHES);
        const after = await sessionIds(admin);
        const same = JSON.stringify([...before].sort()) === JSON.stringify([...after].sort());
        assert(same, `after reload other rows are shown: [${before.join(', ')}] then [${after.join(', ')}]`);
    });

    await check('session page shows live .out', admin, async () => {
        await goto(admin, sessionPath);
        const h1 = await headingOf(admin);
        assert(h1.includes(LIVE_SESSION), `h1 is "${h1}", not about ${LIVE_SESSION}`);
        await expectSelector(admin, '#out-tail[data-live-ready]', {
            state: 'attached',
            timeout: LIVE_READY_TIMEOUT,
        });
        await emit('waiting-for-out');
        try {
            await admin.waitForFunction(
                () => /live-marker-./.test(document.querySelector('#out-tail')?.textContent || ''),
                null,
                { timeout: OUT_TIMEOUT },
            );
        } catch {
            throw new Error(`#out-tail showed no live-marker- record within ${OUT_TIMEOUT / 1000} s`);
        }
        // The record's CR and LF are its text, not SSE line ends: one record,
        // shown exactly as appended.
        const shown = await admin.evaluate(() =>
            [...document.querySelectorAll('#out-tail .record')]
                .map((r) => r.textContent)
                .filter((t) => t.includes('live-marker-')),
        );
        const want = 'live-marker-42\nid: 7\r\nretry: 1\rend';
        assert(
            shown.length === 1 && shown[0].endsWith(` ${want}`),
            `the live record reads ${JSON.stringify(shown)}, not one record ${JSON.stringify(want)}`,
        );
    });

    await check('admin sees actions', admin, async () => {
        if (pathname(admin) !== sessionPath) {
            await goto(admin, sessionPath);
        }
        await expectSelector(admin, 'button[data-action="close"]', { state: 'attached' });
    });

    // ---- jobs (admin): a failed probe job, retried from its page ----

    await check('jobs list of failed probes', admin, async () => {
        await goto(admin, FAILED_PROBES);
        await expectSelector(admin, 'nav a[href="/dashboard/jobs"][aria-current="page"]', { state: 'attached' });
        const row = `table#jobs tr[data-job-id="${PROBE_JOB}"]`;
        await expectSelector(admin, row);
        const badge = ((await admin.locator(`${row} .badge`).textContent()) || '').trim();
        assert(badge === 'failed', `the probe job's row says "${badge}", not failed`);
        await expectSelector(admin, `${row} input[type=checkbox][name=ids]`);
        await expectSelector(admin, 'button[data-action="retry-selected"]');
    });

    await check('retry-all confirmation page', admin, async () => {
        await goto(admin, FAILED_PROBES);
        await submitForm(admin, 'form#retry-matching');
        assert(pathname(admin) === '/dashboard/jobs/retry-matching', `landed on ${admin.url()}`);
        const text = ((await admin.locator('#retry-preview').textContent()) || '').replace(/\s+/g, ' ');
        assert(/Retry 2 failed jobs of kind probe\?/.test(text), `the preview says: ${text.slice(0, 200)}`);
        await expectSelector(admin, 'button[data-action="retry-matching-confirm"]');
    });

    await check('job detail before retry', admin, async () => {
        await goto(admin, FAILED_PROBES);
        await admin.click(`tr[data-job-id="${PROBE_JOB}"] a`);
        await admin.waitForURL((url) => url.pathname === probePath, { timeout: NAV_TIMEOUT });
        const status = ((await admin.locator('#job-status').textContent()) || '').trim();
        assert(status === 'failed', `#job-status says "${status}", not failed`);
        const attempts = await admin.locator('table#attempts tbody tr').count();
        assert(attempts >= 1, 'no attempt rows');
        const errors = (await admin.locator('table#attempts').textContent()) || '';
        assert(errors.includes('on purpose'), 'the attempts show no probe error');
        await expectSelector(admin, 'button[data-action="retry"]');
    });

    await check('retry a failed job from its page', admin, async () => {
        if (pathname(admin) !== probePath) {
            await goto(admin, probePath);
        }
        // The button's form asks confirm(); the dialog handler says yes.
        const loaded = admin.waitForEvent('load', { timeout: NAV_TIMEOUT });
        await admin.click('button[data-action="retry"]');
        await loaded;
        assert(pathname(admin) === probePath, `the retry landed on ${admin.url()}`);
        const deadline = Date.now() + JOB_TIMEOUT;
        let status = '';
        for (;;) {
            status = ((await admin.locator('#job-status').textContent()) || '').trim();
            if (status === 'succeeded' || Date.now() > deadline) {
                break;
            }
            await new Promise((resolve) => setTimeout(resolve, JOB_POLL));
            await admin.reload();
        }
        assert(status === 'succeeded', `#job-status still says "${status}" after ${JOB_TIMEOUT / 1000} s`);
    });

    // ---- runs, a run, failed handoffs and a retry ----

    await check('runs list', admin, async () => {
        await goto(admin, '/dashboard/runs');
        await expectSelector(admin, RUN_ROWS);
        await expectSelector(admin, 'nav a[href="/dashboard/runs"][aria-current="page"]', { state: 'attached' });
        await expectSelector(admin, 'form#filters select[name=status]');
    });

    await check('run page by keyboard', admin, async () => {
        if (pathname(admin) !== '/dashboard/runs') {
            await goto(admin, '/dashboard/runs');
        }
        // The newest run is the second handoff's stuck one: QUEUED, cancelable.
        const link = admin.locator(RUN_LINKS).first();
        const runId = ((await link.textContent()) || '').trim();
        await link.focus();
        const loaded = admin.waitForEvent('load', { timeout: NAV_TIMEOUT });
        await admin.keyboard.press('Enter');
        await loaded;
        const h1 = await headingOf(admin);
        assert(h1.includes(runId), `h1 is "${h1}", not about ${runId}`);
        await expectSelector(admin, 'pre#run-payload');
        await expectSelector(admin, 'button[data-action="cancel"]', { state: 'attached' });
    });

    await check('failed handoffs', admin, async () => {
        await goto(admin, '/dashboard/handoffs');
        await expectSelector(admin, handoffRow(HANDOFF_SESSION));
        await expectSelector(admin, handoffRow(HANDOFF_KEEP));
        await expectSelector(admin, handoffRow(HANDOFF_SESSION) + ' button[data-action="retry"]');
    });

    await check('retry a failed handoff', admin, async () => {
        if (pathname(admin) !== '/dashboard/handoffs') {
            await goto(admin, '/dashboard/handoffs');
        }
        await submitForm(admin, handoffRow(HANDOFF_SESSION) + ' form');
        assert(pathname(admin) === '/dashboard/handoffs', `the retry landed on ${admin.url()}`);
        const left = await admin.locator(handoffRow(HANDOFF_SESSION)).count();
        assert(left === 0, `${HANDOFF_SESSION} is still listed after its retry`);
        await expectSelector(admin, handoffRow(HANDOFF_KEEP));
    });

    // ---- end of runs and handoffs ----

    // ---- operations: schedules, replication and backfills, environments ----

    await check('schedules page', admin, async () => {
        // Through the bar's Operations menu, by keyboard.
        await goto(admin, '/dashboard/runs');
        await admin.focus('nav .nav-menu summary');
        await admin.keyboard.press('Enter');
        await expectSelector(admin, 'nav .nav-menu a[href="/dashboard/schedules"]', { state: 'visible' });
        await shot(admin, 'operations menu');
        const loaded = admin.waitForEvent('load', { timeout: NAV_TIMEOUT });
        await admin.click('nav .nav-menu a[href="/dashboard/schedules"]');
        await loaded;
        await expectSelector(admin, 'nav a[href="/dashboard/schedules"][aria-current="page"]', { state: 'attached' });
        await expectSelector(admin, 'table#schedules tr[data-schedule="run-sweep"]');
        await expectSelector(admin, 'table#schedules tr[data-schedule="run-sweep"] a[href^="/dashboard/jobs/"]');
        const next = await admin.locator('table#schedules time[datetime]').count();
        assert(next > 0, 'no next fire time on the schedules page');
    });

    await check('start a backfill and watch it complete', admin, async () => {
        await goto(admin, '/dashboard/replication');
        await expectSelector(admin, '#replication-off');
        const loaded = admin.waitForEvent('load', { timeout: NAV_TIMEOUT });
        await admin.click('button[data-action="start-backfill"]');
        await loaded;
        assert(pathname(admin) === '/dashboard/replication', `the start landed on ${admin.url()}`);
        const deadline = Date.now() + BACKFILL_TIMEOUT;
        let states = [];
        for (;;) {
            states = await admin.$$eval('table#backfills tbody tr .badge', (b) => b.map((x) => x.textContent.trim()));
            if ((states.length >= 2 && states.every((s) => s === 'completed')) || Date.now() > deadline) {
                break;
            }
            await new Promise((resolve) => setTimeout(resolve, JOB_POLL));
            await admin.reload();
        }
        assert(states.length >= 2, `${states.length} backfill rows, not one per table`);
        assert(states.every((s) => s === 'completed'), `backfills still ${states.join(', ')}`);
    });

    let rotatedKey = '';
    await check('rotate a key and see it once', admin, async () => {
        await goto(admin, '/dashboard/environments');
        const row = `table#environments tr[data-env-id="${ROTATE_ENV}"]`;
        await expectSelector(admin, row + ' button[data-action="rotate-key"]');
        const loaded = admin.waitForEvent('load', { timeout: NAV_TIMEOUT });
        await admin.click(row + ' button[data-action="rotate-key"]');
        await loaded;
        rotatedKey = ((await admin.locator('pre#new-key').textContent()) || '').trim();
        assert(/^tr_[a-z]+_/.test(rotatedKey), `pre#new-key shows "${rotatedKey.slice(0, 12)}…", not a key`);
        assert(!admin.url().includes(rotatedKey), 'the new key is in the URL');
        await shot(admin, 'new key shown once');
        await goto(admin, '/dashboard/environments');
        const html = await admin.content();
        assert(!html.includes(rotatedKey), 'the environments page shows the key again');
        // The new key's hint (its first 12 characters), and when it was rotated.
        const hint = ((await admin.locator(`${row} td[data-label="Key"] code`).textContent()) || '').trim();
        assert(hint === keyHint(rotatedKey), `the key column shows "${hint}", not the new key's hint`);
        const rotatedAt = await admin.locator(`${row} td[data-label="Key rotated"] time[datetime]`).getAttribute('datetime');
        assert(!Number.isNaN(Date.parse(rotatedAt || '')), `no rotation time: ${rotatedAt}`);
    });

    await check('logout', admin, async () => {
        if (!(await admin.locator(LOGOUT_FORM).count())) {
            await goto(admin, '/dashboard/sessions');
        }
        await submitForm(admin, LOGOUT_FORM);
        assert(pathname(admin) === '/dashboard/login', `logout landed on ${admin.url()}`);
        const res = await goto(admin, '/dashboard/sessions');
        assert(pathname(admin) === '/dashboard/login', `after logout /dashboard/sessions shows ${admin.url()}`);
        assert(res.request().redirectedFrom(), 'the login page came without a redirect');
    });

    await admin.context().close();

    // A fresh context: no cookie of the admin's carries over.
    const viewer = await newPage(browser, 'viewer');

    await check('viewer sees no actions', viewer, async () => {
        await logIn(viewer, VIEWER);
        await goto(viewer, sessionPath);
        const h1 = await headingOf(viewer);
        assert(h1.includes(LIVE_SESSION), `h1 is "${h1}", not about ${LIVE_SESSION}`);
        await assertNoActionButtons(viewer, sessionPath);
        await shot(viewer, 'viewer session page');
        await goto(viewer, '/dashboard/sessions');
        await expectSelector(viewer, SESSION_ROWS);
        await assertNoActionButtons(viewer, '/dashboard/sessions');
    });

    await check('viewer sees no job actions', viewer, async () => {
        await goto(viewer, FAILED_PROBES);
        await expectSelector(viewer, `table#jobs tr[data-job-id="${STUCK_JOB}"]`);
        await assertNoActionButtons(viewer, FAILED_PROBES);
        const boxes = await viewer.locator('input[name=ids]').count();
        assert(boxes === 0, `the viewer's jobs list has ${boxes} checkbox(es)`);
        await shot(viewer, 'viewer jobs list');
        const res = await goto(viewer, '/dashboard/jobs/retry-matching?kind=probe').catch((err) => err);
        assert(res instanceof Error && /403/.test(res.message), 'the viewer opened the retry-all preview');
        // Last, so that the check's screenshot is of the failed job's page.
        const stuckPath = '/dashboard/jobs/' + encodeURIComponent(STUCK_JOB);
        await goto(viewer, stuckPath);
        const status = ((await viewer.locator('#job-status').textContent()) || '').trim();
        assert(status === 'failed', `#job-status says "${status}", not failed`);
        await assertNoActionButtons(viewer, stuckPath);
    });

    await check('viewer sees no actions on runs and handoffs', viewer, async () => {
        await goto(viewer, '/dashboard/runs');
        await expectSelector(viewer, RUN_ROWS);
        await assertNoActionButtons(viewer, '/dashboard/runs');
        // The newest run is the retry's continuation: QUEUED, so an admin could cancel it.
        const href = await viewer.locator(RUN_LINKS).first().getAttribute('href');
        await goto(viewer, href);
        await expectSelector(viewer, 'pre#run-payload');
        await assertNoActionButtons(viewer, href);
        await shot(viewer, 'viewer run page');
        await goto(viewer, '/dashboard/handoffs');
        await expectSelector(viewer, handoffRow(HANDOFF_KEEP));
        await assertNoActionButtons(viewer, '/dashboard/handoffs');
    });

    await check('viewer sees no actions on operations pages', viewer, async () => {
        for (const where of ['/dashboard/schedules', '/dashboard/replication', '/dashboard/environments']) {
            await goto(viewer, where);
            await expectSelector(viewer, 'h1');
            await assertNoActionButtons(viewer, where);
            if (rotatedKey) {
                assert(!(await viewer.content()).includes(rotatedKey), `${where} shows the rotated key`);
            }
            await shot(viewer, 'viewer ' + where.split('/').pop());
        }
        await expectSelector(viewer, 'table#environments');
        // The viewer reads the same hint the admin saw, not the key.
        const hint = await viewer
            .locator(`table#environments tr[data-env-id="${ROTATE_ENV}"] td[data-label="Key"] code`)
            .textContent();
        assert(!rotatedKey || hint.trim() === keyHint(rotatedKey), `the viewer sees the key hint "${hint}"`);
    });

    await check('audit page', viewer, async () => {
        await goto(viewer, '/dashboard/audit');
        assert(pathname(viewer) === '/dashboard/audit', `/dashboard/audit shows ${viewer.url()}`);
        await expectSelector(viewer, 'table#audit', { state: 'attached' });
        // The admin's actions above, each a row naming the admin, the action
        // and its target, newest first; the viewer has done nothing.
        const rows = await viewer.$$eval('table#audit tbody tr', (trs) =>
            trs.map((tr) => {
                const cells = [...tr.querySelectorAll('td')].map((td) => td.textContent.trim());
                const at = tr.querySelector('time[datetime]')?.getAttribute('datetime') || '';
                return { at, operator: cells[1], action: cells[2], target: cells[3], detail: cells[4] };
            }),
        );
        const expected = [
            ['job.retry', `job:${PROBE_JOB}`],
            ['handoff.retry', `session:${HANDOFF_SESSION}`],
            ['clickhouse.backfill', 'clickhouse'],
            ['environment.rotate_key', `environment:${ROTATE_ENV}`],
        ];
        const found = (action, target) => rows.filter((r) => r.action === action && r.target === target);
        for (const [action, target] of expected) {
            const hits = found(action, target);
            assert(hits.length === 1, `${hits.length} audit rows for ${action} on ${target}: ${JSON.stringify(rows)}`);
            assert(hits[0].operator === ADMIN.email, `${action} is recorded as ${hits[0].operator}'s`);
        }
        // The seeding's own actions are recorded as the command line or an
        // environment's key; no other operator acted.
        const others = rows.filter((r) => r.operator.includes('@') && r.operator !== ADMIN.email);
        assert(others.length === 0, `audit rows by another operator: ${JSON.stringify(others)}`);
        const unnamed = rows.filter((r) => !/^(cli|secret-key \S+|public-token \S+|run \S+|\S+@\S+)$/.test(r.operator));
        assert(unnamed.length === 0, `audit rows that do not say who acted: ${JSON.stringify(unnamed)}`);
        const times = rows.map((r) => Date.parse(r.at));
        assert(times.every((t, i) => !Number.isNaN(t) && (i === 0 || t <= times[i - 1])), `not newest first: ${rows.map((r) => r.at)}`);
        // Newest first: the key rotation came after the backfill, the retries before it.
        const index = (action) => rows.findIndex((r) => r.action === action);
        assert(index('environment.rotate_key') < index('clickhouse.backfill'), 'the rotation is not above the backfill');
        assert(index('clickhouse.backfill') < index('handoff.retry'), 'the backfill is not above the handoff retry');
        assert(index('handoff.retry') < index('job.retry'), 'the handoff retry is not above the job retry');
        const rotation = found('environment.rotate_key', `environment:${ROTATE_ENV}`)[0];
        if (rotatedKey) {
            const detail = JSON.stringify({ hint: keyHint(rotatedKey) });
            assert(rotation.detail === detail, `the rotation's detail is ${rotation.detail}, not ${detail}`);
        } else {
            assert(/^\{"hint":"tr_[^"]*…"\}$/.test(rotation.detail), `the rotation's detail: ${rotation.detail}`);
        }
    });

    await viewer.context().close();
    await tour();
} catch (err) {
    // Only setup outside a check (a context or page) lands here.
    await fail('run', err);
} finally {
    await browser.close().catch(() => {});
}

await finish();
