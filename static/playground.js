// The agent playground. On the start form (templates/dashboard/
// playground.html) it points the task field's suggestions at the selected
// environment's tasks. On the conversation page (templates/dashboard/
// playground_session.html) it talks to the session's public realtime
// endpoints exactly as a customer's browser app would, with the public token
// the server put in #playground's data-token (never in a URL):
//
//  - a message is appended to .in as the official TriggerChatTransport sends
//    one: POST {in}/append, the raw body {"kind":"message","payload":{message,
//    chatId, trigger:"submit-message"}}, Authorization: Bearer and an
//    X-Part-Id reused if the append is retried; Stop appends {"kind":"stop"};
//  - .out and .in are followed from their start over SSE (v2 `event: batch`
//    frames), so a reopened session shows its history. EventSource cannot
//    send an Authorization header, so the stream is read with fetch, and
//    resumed with Last-Event-ID when the server's long-poll window ends;
//  - .out's UI message chunks become the assistant's bubbles (text assembled
//    from deltas), a turn-complete control record ends a turn and carries a
//    fresh token for the session, which the page adopts.
//
// Chosen: plain JavaScript, no build step, rather than the SDK's transport
// bundled and vendored: the page needs a small part of it, and this way what
// the page sends is in one readable file.
(function () {
    'use strict';

    // The start form: the task field suggests the selected environment's
    // tasks (one <datalist id="tasks-{env}"> each).
    var start = document.getElementById('playground-start');
    if (start) {
        var envSelect = start.querySelector('select[name="env"]');
        var taskInput = start.querySelector('input[name="task"]');
        envSelect.addEventListener('change', function () {
            taskInput.setAttribute('list', 'tasks-' + envSelect.value);
        });
        return;
    }

    var root = document.getElementById('playground');
    if (!root || !window.fetch || !window.ReadableStream) {
        return;
    }

    var cfg = root.dataset;
    var token = cfg.token;
    var stopped = false;
    var RETRY_MIN = 500; // ms before reconnecting a dropped stream
    var RETRY_MAX = 5000;
    var REFUSED = [400, 404, 409, 410, 422]; // as the official client: do not retry
    var SEND_TRIES = 3;

    var messages = document.getElementById('pg-messages');
    var empty = document.getElementById('pg-empty');
    var thinking = document.getElementById('pg-thinking');
    var errorBox = document.getElementById('pg-error');
    var composer = document.getElementById('pg-composer');
    var input = document.getElementById('pg-text');
    var sendButton = document.getElementById('pg-send');
    var stopButton = document.getElementById('pg-stop');
    var raw = { in: document.getElementById('pg-raw-in'), out: document.getElementById('pg-raw-out') };

    root.classList.add('pg-js');

    // ---- small helpers ----

    function el(tag, className, text) {
        var e = document.createElement(tag);
        if (className) {
            e.className = className;
        }
        if (text !== undefined) {
            e.textContent = text;
        }
        return e;
    }

    function header(record, name) {
        var hs = record.headers || [];
        for (var i = 0; i < hs.length; i++) {
            if (hs[i][0] === name) {
                return hs[i][1];
            }
        }
        return null;
    }

    function parseJson(text) {
        try {
            return JSON.parse(text);
        } catch (e) {
            return undefined;
        }
    }

    // A random id from getRandomValues (randomUUID needs a secure context,
    // which a dev server reached by its LAN name is not).
    function randomId() {
        var bytes = new Uint8Array(16);
        window.crypto.getRandomValues(bytes);
        return Array.prototype.map
            .call(bytes, function (b) {
                return ('0' + b.toString(16)).slice(-2);
            })
            .join('');
    }

    function sleep(ms) {
        return new Promise(function (resolve) {
            setTimeout(resolve, ms);
        });
    }

    function showError(text) {
        errorBox.textContent = text;
        errorBox.hidden = !text;
    }

    // A JWT's expiry (seconds), or 0.
    function expiryOf(jwt) {
        var part = (jwt || '').split('.')[1];
        if (!part) {
            return 0;
        }
        var b64 = part.replace(/-/g, '+').replace(/_/g, '/');
        while (b64.length % 4) {
            b64 += '=';
        }
        var claims = parseJson(atob(b64));
        return (claims && claims.exp) || 0;
    }

    // The agent hands a fresh token at each turn's end; a replayed (older)
    // one from the history never replaces a newer one.
    function adoptToken(fresh) {
        if (fresh && expiryOf(fresh) > expiryOf(token)) {
            token = fresh;
        }
    }

    // ---- tabs (a phone shows one pane at a time; wide screens show all) ----

    var tabs = root.querySelectorAll('[role="tab"]');
    function selectTab(id) {
        for (var i = 0; i < tabs.length; i++) {
            var tab = tabs[i];
            var on = tab.dataset.tab === id;
            tab.setAttribute('aria-selected', on ? 'true' : 'false');
            tab.tabIndex = on ? 0 : -1;
            document.getElementById(tab.dataset.tab).classList.toggle('active', on);
        }
    }
    for (var t = 0; t < tabs.length; t++) {
        tabs[t].addEventListener('click', function (ev) {
            selectTab(ev.currentTarget.dataset.tab);
        });
        // Arrow keys move between tabs (only the selected one is in the Tab order).
        tabs[t].addEventListener('keydown', function (ev) {
            var step = { ArrowRight: 1, ArrowLeft: -1 }[ev.key];
            if (!step) {
                return;
            }
            var list = Array.prototype.slice.call(tabs);
            var next = list[(list.indexOf(ev.currentTarget) + step + list.length) % list.length];
            selectTab(next.dataset.tab);
            next.focus();
            ev.preventDefault();
        });
    }
    selectTab('pg-chat');

    // ---- the raw panes ----

    var counts = { in: 0, out: 0 };

    function shorten(value) {
        return value.length > 48 ? value.slice(0, 45) + '…' : value;
    }

    function showRaw(io, record) {
        var li = el('li', 'pg-record');
        li.dataset.seq = record.seq_num;
        li.appendChild(el('span', 'pg-seq', '#' + record.seq_num));
        (record.headers || []).forEach(function (h) {
            li.appendChild(el('span', 'pg-header', h[0] + ': ' + shorten(String(h[1]))));
        });
        li.appendChild(el('code', 'pg-body', record.body === '' ? '(control record, empty body)' : record.body));
        var box = raw[io];
        var atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 8;
        box.appendChild(li);
        if (atBottom) {
            box.scrollTop = box.scrollHeight;
        }
        counts[io]++;
        var badge = root.querySelector('[data-count="' + io + '"]');
        if (badge) {
            badge.textContent = String(counts[io]);
        }
    }

    // ---- the conversation ----

    // Bubbles are kept in time order (a record's timestamp), so the history
    // of .in and .out, which arrive on two streams, interleaves correctly.
    function place(item, at) {
        item.dataset.at = String(at);
        var children = messages.children;
        for (var i = children.length - 1; i >= 0; i--) {
            if (Number(children[i].dataset.at) <= at) {
                messages.insertBefore(item, children[i].nextSibling);
                return finishPlacing();
            }
        }
        messages.insertBefore(item, messages.firstChild);
        finishPlacing();
    }

    function finishPlacing() {
        empty.hidden = messages.children.length > 0;
        var scroller = document.scrollingElement;
        scroller.scrollTop = scroller.scrollHeight;
    }

    function bubble(role, label, at) {
        var li = el('li', 'pg-msg ' + role);
        li.appendChild(el('span', 'pg-who', label));
        var body = el('div', 'pg-text');
        li.appendChild(body);
        place(li, at);
        return li;
    }

    function note(text, at, className) {
        var li = el('li', 'pg-note ' + (className || ''), text);
        place(li, at);
        return li;
    }

    // What the user sent: a message record's text, as the agent reads it
    // (raw, or wrapped in the stream envelope).
    function inputOf(body) {
        var v = parseJson(body);
        if (v && v.kind === undefined && v.data !== undefined) {
            v = typeof v.data === 'string' ? parseJson(v.data) : v.data;
        }
        return v && typeof v === 'object' ? v : null;
    }

    function textOf(message) {
        return (message.parts || [])
            .filter(function (p) {
                return p && p.type === 'text';
            })
            .map(function (p) {
                return p.text;
            })
            .join('');
    }

    var lastAsked = -1; // seq of the newest message on .in
    var lastAnswered = -1; // newest .in seq a turn-complete answered

    function updateThinking() {
        var busy = lastAsked > lastAnswered;
        thinking.hidden = !busy;
        if (stopButton) {
            stopButton.hidden = !busy;
        }
        root.dataset.busy = busy ? 'true' : 'false';
    }

    function onInput(record) {
        showRaw('in', record);
        var v = inputOf(record.body);
        if (!v) {
            return;
        }
        if (v.kind === 'stop') {
            note('Stop sent', record.timestamp, 'pg-stop-note');
            return;
        }
        var p = v.kind === 'message' && v.payload;
        if (!p) {
            return;
        }
        if (p.trigger === 'submit-message' && p.message) {
            var b = bubble('user', 'You', record.timestamp);
            b.dataset.seq = record.seq_num;
            b.querySelector('.pg-text').textContent = textOf(p.message);
            lastAsked = Math.max(lastAsked, record.seq_num);
        } else if (p.trigger === 'close') {
            note('The client closed the conversation', record.timestamp);
        }
        updateThinking();
    }

    // The assistant message being streamed, and its parts by id.
    var current = null;

    function assistant(at) {
        if (!current) {
            var li = bubble('assistant', 'Agent', at);
            current = { li: li, body: li.querySelector('.pg-text'), parts: {} };
        }
        return current;
    }

    function part(msg, id, className) {
        var key = className + ':' + id;
        if (!msg.parts[key]) {
            msg.parts[key] = el('span', className);
            msg.body.appendChild(msg.parts[key]);
        }
        return msg.parts[key];
    }

    function endTurn(record) {
        if (current) {
            // A turn that ends before its message finished was stopped.
            if (current.li.dataset.done !== 'true') {
                current.li.appendChild(el('span', 'pg-cut', 'stopped'));
            }
            current.li.dataset.done = 'true';
            current = null;
        }
        var answered = Number(header(record, 'session-in-event-id'));
        if (!isNaN(answered) && answered >= 0) {
            lastAnswered = Math.max(lastAnswered, answered);
        } else {
            lastAnswered = lastAsked;
        }
        adoptToken(header(record, 'public-access-token'));
        var end = note('turn complete', record.timestamp, 'pg-turn-end');
        end.setAttribute('aria-hidden', 'true');
        updateThinking();
    }

    function onChunk(chunk, record) {
        var at = record.timestamp;
        switch (chunk.type) {
            case 'start':
                if (current && current.body.childNodes.length > 0) {
                    current.li.dataset.done = 'true';
                    current = null;
                }
                assistant(at);
                if (chunk.messageId) {
                    current.li.dataset.messageId = chunk.messageId;
                }
                break;
            case 'text-start':
                part(assistant(at), chunk.id, 'pg-part');
                break;
            case 'text-delta':
                part(assistant(at), chunk.id, 'pg-part').textContent += chunk.delta;
                break;
            case 'reasoning-start':
                part(assistant(at), chunk.id, 'pg-reasoning');
                break;
            case 'reasoning-delta':
                part(assistant(at), chunk.id, 'pg-reasoning').textContent += chunk.delta;
                break;
            case 'tool-input-available':
                assistant(at).body.appendChild(el('span', 'pg-tool', 'tool ' + chunk.toolName + ' called'));
                break;
            case 'tool-output-available':
                assistant(at).body.appendChild(el('span', 'pg-tool', 'tool answered'));
                break;
            case 'error':
                assistant(at).body.appendChild(el('span', 'pg-chunk-error', 'error: ' + chunk.errorText));
                break;
            case 'abort':
                assistant(at).body.appendChild(el('span', 'pg-tool', '(stopped)'));
                break;
            case 'finish':
                if (current) {
                    current.li.dataset.done = 'true';
                }
                break;
            default:
                // text-end, steps, metadata, data-* parts: nothing to show.
                break;
        }
    }

    function onOutput(record) {
        showRaw('out', record);
        var control = header(record, 'trigger-control');
        if (control === 'turn-complete') {
            endTurn(record);
            return;
        }
        if (control === 'session-closed') {
            note('The session was closed', record.timestamp, 'pg-closed');
            setClosed('This session was closed; the conversation is read-only now.');
            return;
        }
        if (control) {
            return;
        }
        var envelope = parseJson(record.body);
        var chunk = envelope && envelope.data;
        if (!chunk || typeof chunk !== 'object' || typeof chunk.type !== 'string') {
            return;
        }
        if (chunk.type === 'trigger:turn-complete') {
            // Older agents end a turn with a data chunk instead.
            endTurn(record);
            return;
        }
        onChunk(chunk, record);
    }

    function setClosed(text) {
        if (composer) {
            composer.querySelectorAll('input, button').forEach(function (c) {
                c.disabled = true;
            });
        }
        showError(text);
    }

    // ---- following a channel over SSE ----

    // The frames of a text/event-stream body: {event, data} each.
    function frames(text) {
        var out = [];
        text.split('\n\n').forEach(function (block) {
            var ev = { event: 'message', data: [] };
            block.split('\n').forEach(function (line) {
                if (line === '' || line.charAt(0) === ':') {
                    return;
                }
                var colon = line.indexOf(':');
                var name = colon < 0 ? line : line.slice(0, colon);
                var value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
                if (name === 'event') {
                    ev.event = value;
                } else if (name === 'data') {
                    ev.data.push(value);
                }
            });
            if (ev.data.length > 0) {
                out.push({ event: ev.event, data: ev.data.join('\n') });
            }
        });
        return out;
    }

    async function follow(io, url, onRecord) {
        var last = null;
        var wait = RETRY_MIN;
        while (!stopped) {
            var res;
            try {
                var headers = { Authorization: 'Bearer ' + token, Accept: 'text/event-stream' };
                if (last !== null) {
                    headers['Last-Event-ID'] = String(last);
                }
                res = await fetch(url, { headers: headers, cache: 'no-store' });
            } catch (err) {
                await sleep(wait);
                wait = Math.min(wait * 2, RETRY_MAX);
                continue;
            }
            if (res.status === 401 || res.status === 403) {
                stopped = true;
                setClosed('The page’s token expired or was refused. Reload the page for a fresh one.');
                return;
            }
            if (REFUSED.indexOf(res.status) >= 0) {
                var why = parseJson(await res.text());
                showError('Following .' + io + ' failed: ' + ((why && why.error) || 'HTTP ' + res.status));
                return;
            }
            if (!res.ok || !res.body) {
                await sleep(wait);
                wait = Math.min(wait * 2, RETRY_MAX);
                continue;
            }
            wait = RETRY_MIN;
            root.dataset[io + 'Ready'] = 'true';
            var reader = res.body.getReader();
            var decoder = new TextDecoder();
            var buffer = '';
            try {
                for (;;) {
                    var step = await reader.read();
                    if (step.done) {
                        break;
                    }
                    buffer += decoder.decode(step.value, { stream: true }).replace(/\r\n?/g, '\n');
                    var end = buffer.lastIndexOf('\n\n');
                    if (end < 0) {
                        continue;
                    }
                    var complete = buffer.slice(0, end);
                    buffer = buffer.slice(end + 2);
                    frames(complete).forEach(function (f) {
                        if (f.event !== 'batch') {
                            return;
                        }
                        var batch = parseJson(f.data);
                        (batch && batch.records ? batch.records : []).forEach(function (r) {
                            last = r.seq_num;
                            onRecord(r);
                        });
                    });
                }
            } catch (err) {
                // The connection dropped: resume after the last record seen.
            }
            // The server's long-poll window ended (or the connection dropped):
            // reconnect from where this one stopped.
        }
    }

    // ---- sending ----

    async function append(body) {
        var partId = randomId(); // the same on every try: the server keeps one
        var lastError = '';
        for (var attempt = 0; attempt < SEND_TRIES; attempt++) {
            var res;
            try {
                res = await fetch(cfg.inUrl + '/append', {
                    method: 'POST',
                    headers: {
                        'Content-Type': 'application/json',
                        Authorization: 'Bearer ' + token,
                        'X-Part-Id': partId
                    },
                    body: body
                });
            } catch (err) {
                lastError = 'the server could not be reached';
                await sleep(RETRY_MIN * (attempt + 1));
                continue;
            }
            if (res.ok) {
                return;
            }
            var answer = parseJson(await res.text());
            lastError = (answer && answer.error) || 'HTTP ' + res.status;
            if (res.status < 500) {
                break;
            }
            await sleep(RETRY_MIN * (attempt + 1));
        }
        throw new Error(lastError);
    }

    if (composer && cfg.canSend === 'true') {
        composer.addEventListener('submit', async function (ev) {
            ev.preventDefault();
            var text = input.value.trim();
            if (!text) {
                return;
            }
            var record = {
                kind: 'message',
                payload: {
                    message: { id: 'u-' + randomId(), role: 'user', parts: [{ type: 'text', text: text }] },
                    chatId: cfg.chatId,
                    trigger: 'submit-message'
                }
            };
            sendButton.disabled = true;
            showError('');
            try {
                await append(JSON.stringify(record));
                input.value = '';
            } catch (err) {
                showError('The message was not sent: ' + err.message);
            } finally {
                sendButton.disabled = false;
                input.focus();
            }
        });
        stopButton.addEventListener('click', async function () {
            try {
                await append(JSON.stringify({ kind: 'stop' }));
            } catch (err) {
                showError('Stop was not sent: ' + err.message);
            }
        });
    }

    follow('in', cfg.inUrl, onInput);
    follow('out', cfg.outUrl, onOutput);
})();
