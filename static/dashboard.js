// sessiond operator dashboard: the little behaviour that htmx attributes do
// not cover. Loaded with <script src> (the Content-Security-Policy allows no
// inline script), works with or without htmx on the page.
//
//  - <time datetime="..."> shows a relative time ("3 min ago", "in 2 h",
//    "just now"); its title holds the absolute local time. Refreshed every
//    30 s and after every htmx swap.
//  - Live polling: htmx requests from an element with a data-live attribute
//    are cancelled while the tab is hidden or while the checkbox
//    #live-refresh is unchecked; body.paused says so to the stylesheet.
//  - SSE: an element whose sse-connect stream is open gets data-live-ready
//    (and so do its sse-swap children); a pre.tail that was scrolled to the
//    bottom stays there as records arrive.
//  - CSRF: every htmx request carries X-CSRF-Token from
//    <meta name="csrf-token" content="...">.
//  - <form data-confirm="message"> (or a submit button with data-confirm)
//    asks confirm(message) before it submits.
(function () {
    'use strict';

    // ---- relative times ----

    var SECOND = 1000;
    var MINUTE = 60 * SECOND;
    var HOUR = 60 * MINUTE;
    var DAY = 24 * HOUR;

    // Largest unit first; a value is shown in the first unit it reaches
    // (at least 1 of it once rounded).
    var UNITS = [
        { ms: 365 * DAY, label: 'y' },
        { ms: 30 * DAY, label: 'mo' },
        { ms: DAY, label: 'd' },
        { ms: HOUR, label: 'h' },
        { ms: MINUTE, label: 'min' },
        { ms: SECOND, label: 's' }
    ];

    var absoluteFormat = (function () {
        try {
            return new Intl.DateTimeFormat(undefined, {
                dateStyle: 'medium',
                timeStyle: 'long'
            });
        } catch (e) {
            return null;
        }
    })();

    function absolute(date) {
        return absoluteFormat ? absoluteFormat.format(date) : date.toLocaleString();
    }

    function relative(date, now) {
        var diff = date.getTime() - now;
        var size = Math.abs(diff);
        if (size < 45 * SECOND) {
            return 'just now';
        }
        for (var i = 0; i < UNITS.length; i++) {
            var unit = UNITS[i];
            // Switch to a unit once the value is at least 0.9 of it, so that
            // 55 min reads "55 min" but 58 min reads "1 h".
            if (size >= unit.ms * 0.9 || unit.label === 's') {
                var n = Math.max(1, Math.round(size / unit.ms));
                var text = n + ' ' + unit.label;
                return diff < 0 ? text + ' ago' : 'in ' + text;
            }
        }
        return 'just now';
    }

    function refreshTimes(root) {
        var scope = root && root.querySelectorAll ? root : document;
        var now = Date.now();
        var list = scope.querySelectorAll('time[datetime]');
        for (var i = 0; i < list.length; i++) {
            var el = list[i];
            var date = new Date(el.getAttribute('datetime'));
            if (isNaN(date.getTime())) {
                continue; // leave what the server wrote
            }
            var text = relative(date, now);
            if (el.textContent !== text) {
                el.textContent = text;
            }
            var title = absolute(date);
            if (el.getAttribute('title') !== title) {
                el.setAttribute('title', title);
            }
        }
    }

    // ---- live polling ----

    var LIVE_KEY = 'sessiond.live-refresh';

    function liveBox() {
        return document.getElementById('live-refresh');
    }

    function liveEnabled() {
        var box = liveBox();
        return !box || box.checked;
    }

    function storeLive(on) {
        try {
            window.sessionStorage.setItem(LIVE_KEY, on ? '1' : '0');
        } catch (e) {
            // storage may be disabled; the box still works for this page
        }
    }

    // A poll that swaps the region holding the box renders it afresh; give
    // it back the operator's choice for this tab.
    function restoreLive() {
        var box = liveBox();
        if (!box) {
            return;
        }
        var stored = null;
        try {
            stored = window.sessionStorage.getItem(LIVE_KEY);
        } catch (e) {
            stored = null;
        }
        if (stored === '0' || stored === '1') {
            box.checked = stored === '1';
        }
    }

    function updatePaused() {
        if (!document.body) {
            return;
        }
        var paused = document.hidden || !liveEnabled();
        document.body.classList.toggle('paused', paused);
    }

    // Polling resumes on its own at the next tick; this event lets a server
    // template refresh at once (hx-trigger="every 5s, live-resume").
    function resumeLive() {
        if (document.hidden || !liveEnabled()) {
            return;
        }
        var list = document.querySelectorAll('[data-live]');
        for (var i = 0; i < list.length; i++) {
            list[i].dispatchEvent(new CustomEvent('live-resume', { bubbles: false }));
        }
    }

    // ---- SSE tails ----

    function markLive(source, ready) {
        var targets = [source];
        var children = source.querySelectorAll('[sse-swap], [data-sse-swap]');
        for (var i = 0; i < children.length; i++) {
            targets.push(children[i]);
        }
        for (var j = 0; j < targets.length; j++) {
            if (ready) {
                targets[j].setAttribute('data-live-ready', '');
            } else {
                targets[j].removeAttribute('data-live-ready');
            }
        }
    }

    var STICK_PX = 24; // "at the bottom" if within this many pixels of it

    function atBottom(el) {
        return el.scrollHeight - el.scrollTop - el.clientHeight <= STICK_PX;
    }

    // ---- CSRF ----

    function csrfToken() {
        var meta = document.querySelector('meta[name="csrf-token"]');
        return meta ? meta.getAttribute('content') : null;
    }

    // ---- confirmation ----

    function onSubmit(evt) {
        var form = evt.target;
        if (!(form instanceof HTMLFormElement)) {
            return;
        }
        var submitter = evt.submitter || null;
        var message = null;
        if (submitter && submitter.hasAttribute('data-confirm')) {
            message = submitter.getAttribute('data-confirm');
        } else if (form.hasAttribute('data-confirm')) {
            message = form.getAttribute('data-confirm');
        }
        if (message === null) {
            return;
        }
        if (!window.confirm(message || 'Are you sure?')) {
            // Capture phase on document: stopping here also keeps the event
            // from htmx's own listener on the form.
            evt.preventDefault();
            evt.stopPropagation();
        }
    }

    // ---- wiring ----

    // Listeners go on document (htmx events bubble there from body) and are
    // attached at once, so that requests htmx fires on load already get the
    // CSRF header and the live check.

    document.addEventListener('htmx:configRequest', function (evt) {
        var token = csrfToken();
        if (token && evt.detail && evt.detail.headers) {
            evt.detail.headers['X-CSRF-Token'] = token;
        }
    });

    document.addEventListener('htmx:beforeRequest', function (evt) {
        var elt = (evt.detail && evt.detail.elt) || evt.target;
        if (!elt || !elt.hasAttribute || !elt.hasAttribute('data-live')) {
            return;
        }
        if (document.hidden || !liveEnabled()) {
            evt.preventDefault();
        }
    });

    function afterContent(evt) {
        restoreLive();
        updatePaused();
        var root = (evt && evt.detail && (evt.detail.elt || evt.detail.target)) || document;
        refreshTimes(root.querySelectorAll ? root : document);
    }

    document.addEventListener('htmx:load', afterContent);
    document.addEventListener('htmx:afterSwap', afterContent);

    document.addEventListener('htmx:sseOpen', function (evt) {
        if (evt.target instanceof Element) {
            markLive(evt.target, true);
        }
    });

    document.addEventListener('htmx:sseError', function (evt) {
        if (evt.target instanceof Element) {
            markLive(evt.target, false);
        }
    });

    // Remember, before the swap, whether a tail was at its bottom.
    document.addEventListener('htmx:sseBeforeMessage', function (evt) {
        var el = evt.target;
        if (el instanceof Element && el.matches('pre.tail')) {
            el.dataset.stick = atBottom(el) ? '1' : '0';
        }
    });

    document.addEventListener('htmx:sseMessage', function (evt) {
        var el = evt.target;
        if (el instanceof Element && el.matches('pre.tail')) {
            if (el.dataset.stick !== '0') {
                el.scrollTop = el.scrollHeight;
            }
            refreshTimes(el);
        }
    });

    document.addEventListener('change', function (evt) {
        var box = evt.target;
        if (box && box.id === 'live-refresh') {
            storeLive(box.checked);
            updatePaused();
            resumeLive();
        }
    });

    document.addEventListener('visibilitychange', function () {
        updatePaused();
        resumeLive();
        if (!document.hidden) {
            refreshTimes(document);
        }
    });

    document.addEventListener('submit', onSubmit, true);

    function start() {
        restoreLive();
        updatePaused();
        refreshTimes(document);
        window.setInterval(function () {
            if (!document.hidden) {
                refreshTimes(document);
            }
        }, 30 * SECOND);
    }

    if (document.readyState === 'loading') {
        document.addEventListener('DOMContentLoaded', start);
    } else {
        start();
    }
})();
