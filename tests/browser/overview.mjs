// The overview page in Debian's headless Chromium: its four charts with data
// at 1280 px, the same page at 390 px (no sideways scroll, every chart
// visible and scaled to the screen), switching the window to 7 days
// through the form, and the replication page while replicating at both
// widths.
//
// Run by the Rust test `dashboard_overview::the_overview_in_a_browser`, which
// seeds sessions, runs, failed jobs and replication lag samples and passes
// the environment below. stdout: harness.mjs's protocol.

import {
    DESKTOP,
    PHONE,
    assert,
    assertFits,
    assertNoSidewaysScroll,
    check,
    expectSelector,
    finish,
    goto,
    headingOf,
    logIn,
    newPage,
    requireEnv,
    shot,
    start,
    submitForm,
} from './harness.mjs';

const WATCHDOG = 80_000; // the whole run (the Rust test gives it 90 s)
const CHARTS = ['sessions', 'runs', 'failures', 'lag'];

const env = await requireEnv(['DASHBOARD_URL', 'ADMIN_EMAIL', 'ADMIN_PASSWORD', 'ENV_ID', 'SESSIONS_CREATED']);
const ADMIN = { email: env.ADMIN_EMAIL, password: env.ADMIN_PASSWORD };
const PAGE = `/dashboard/overview?env=${env.ENV_ID}`;

/// What each chart draws: its SVG's size on screen and its marks with their titles.
async function charts(page) {
    return page.evaluate((ids) => {
        return ids.map((id) => {
            const card = document.getElementById(`chart-${id}`);
            const svg = card && card.querySelector('svg.chart');
            const box = svg ? svg.getBoundingClientRect() : null;
            const marks = svg ? [...svg.querySelectorAll('g.bar rect, g.hbar rect, circle.lag-point')] : [];
            return {
                id,
                present: Boolean(card),
                svg: Boolean(svg),
                width: box ? box.width : 0,
                height: box ? box.height : 0,
                label: svg ? svg.getAttribute('aria-labelledby') : null,
                marks: marks.length,
                titled: marks.filter((m) => (m.querySelector('title')?.textContent || '').includes(':')).length,
                bars: svg ? svg.querySelectorAll('g.bar').length : 0,
                total: [...(svg ? svg.querySelectorAll('g.bar') : [])].reduce(
                    (sum, g) => sum + Number(g.getAttribute('data-total')),
                    0,
                ),
            };
        });
    }, CHARTS);
}

function chartsDrawn(drawn, minWidth, maxWidth) {
    for (const c of drawn) {
        assert(c.present && c.svg, `chart ${c.id}: no SVG (${JSON.stringify(c)})`);
        assert(c.marks > 0 && c.titled === c.marks, `chart ${c.id}: ${c.marks} marks, ${c.titled} with a tooltip`);
        assert(c.label, `chart ${c.id}: no text alternative`);
        assert(c.width >= minWidth && c.width <= maxWidth, `chart ${c.id} is ${c.width} px wide`);
        assert(c.height > 60, `chart ${c.id} is ${c.height} px tall`);
    }
}

const browser = await start(WATCHDOG);

const desktop = await newPage(browser, 'desktop', DESKTOP);
await check('the overview at 1280 px shows four charts with data', desktop, async () => {
    await logIn(desktop, ADMIN);
    await goto(desktop, PAGE);
    assert((await headingOf(desktop)) === 'Overview', 'the heading');
    await expectSelector(desktop, 'nav a[href="/dashboard/overview"][aria-current="page"]', { state: 'attached' });
    const drawn = await charts(desktop);
    chartsDrawn(drawn, 400, 1280);
    const sessions = drawn.find((c) => c.id === 'sessions');
    assert(sessions.bars === 24, `24 hourly bars, not ${sessions.bars}`);
    assert(String(sessions.total) === env.SESSIONS_CREATED, `the bars add up to ${sessions.total}`);
    const created = await desktop.getAttribute('[data-count="sessions-created"]', 'data-value');
    assert(created === env.SESSIONS_CREATED, `sessions created says ${created}`);
    // Two charts side by side at this width.
    const tops = await desktop.evaluate(() =>
        ['sessions', 'runs'].map((id) => document.getElementById(`chart-${id}`).getBoundingClientRect().top),
    );
    assert(tops[0] === tops[1], `the first two charts share a row (${tops})`);
});

await check('a bar shows its value as a tooltip', desktop, async () => {
    const title = await desktop.locator('#chart-sessions g.bar rect title').last().textContent();
    assert(/UTC: \d+ sessions$/.test(title), `tooltip "${title}"`);
    const legend = await desktop.locator('#chart-runs ul.legend li').count();
    assert(legend >= 2, `the runs legend has ${legend} statuses`);
});

const phone = await newPage(browser, 'phone', PHONE);
await check('the overview at 390 px: no sideways scroll, every chart visible', phone, async () => {
    await logIn(phone, ADMIN);
    await goto(phone, PAGE);
    await assertNoSidewaysScroll(phone);
    chartsDrawn(await charts(phone), 250, PHONE.width);
    for (const id of CHARTS) {
        await phone.locator(`#chart-${id} svg.chart`).scrollIntoViewIfNeeded();
        assert(await phone.locator(`#chart-${id} svg.chart`).isVisible(), `chart ${id} is visible`);
    }
    await phone.evaluate(() => window.scrollTo(0, 0));
});

await check('switching the window to 7 days through the form', desktop, async () => {
    await desktop.selectOption('#overview-filters select[name="window"]', '7d');
    await submitForm(desktop, '#overview-filters');
    const url = new URL(desktop.url());
    assert(url.searchParams.get('window') === '7d', `the URL says ${url.search}`);
    assert(url.searchParams.get('env') === env.ENV_ID, 'the environment stays picked');
    const sessions = (await charts(desktop)).find((c) => c.id === 'sessions');
    assert(sessions.bars === 7, `7 daily bars, not ${sessions.bars}`);
    assert(String(sessions.total) === env.SESSIONS_CREATED, `the bars add up to ${sessions.total}`);
    const title = await desktop.locator('#chart-sessions h2').textContent();
    assert(title.includes('per day'), `title "${title}"`);
});

/// The replication page's health list: each label with its value's text.
async function replicationHealth(page) {
    return page.$$eval('dl#replication-health dt', (dts) =>
        Object.fromEntries(
            dts.map((dt) => [dt.textContent.trim(), (dt.nextElementSibling?.textContent || '').replace(/\s+/g, ' ').trim()]),
        ),
    );
}

// This server replicates (the dashboard script's does not): the replication
// page's slot health, with the flush the Rust test waited for, at both widths.
await check('the replication page while replicating, at 1280 and 390 px', phone, async () => {
    for (const page of [desktop, phone]) {
        await goto(page, '/dashboard/replication');
        await expectSelector(page, 'dl#replication-health');
        assert(!(await page.locator('#replication-off').count()), 'the page says replication is off');
        // Each label's value, not just the labels: a live slot, a confirmed
        // position, the consumer's lease and the flush the Rust test waited for.
        const f = await replicationHealth(page);
        assert(/^sessiond_\S+ active$/.test(f['Slot']), `Slot: "${f['Slot']}", not an active sessiond slot`);
        assert(/^[0-9A-F]+\/[0-9A-F]+$/.test(f['Confirmed LSN']), `Confirmed LSN: "${f['Confirmed LSN']}"`);
        assert(/^fencing token \d+$/.test(f['Lease holder']), `Lease holder: "${f['Lease holder']}"`);
        assert(/, .+ from commit to visible$/.test(f['Last flush']), `Last flush: "${f['Last flush']}"`);
        const flushTime = await page.$$eval('dl#replication-health dt', (dts) =>
            dts.find((dt) => dt.textContent.trim() === 'Last flush')?.nextElementSibling?.querySelector('time[datetime]')?.getAttribute('datetime'),
        );
        assert(flushTime && !Number.isNaN(Date.parse(flushTime)), `Last flush has no time: ${flushTime}`);
        assert(/^slot generation \d+, created .+: complete$/.test(f['Copy']), `Copy: "${f['Copy']}"`);
        assert(/^\d+ \(\d+ rows\)/.test(f['Pending flushes']), `Pending flushes: "${f['Pending flushes']}"`);
        await assertNoSidewaysScroll(page);
    }
    await shot(desktop, 'replication while replicating 1280');
    await assertFits(phone, 'dl#replication-health');
});

await browser.close();
await finish();
