/**
 * RedMessenger's browser client: one dependency-free ES module, no build
 * step. RedMessenger serves it at `/client.js`.
 *
 *     import { RedMessengerClient } from "/client.js";
 *
 *     const client = new RedMessengerClient({ id: "user1", key: "s3cret" });
 *     client.addEventListener("message", (event) => console.log(event.detail.payload));
 *     client.addEventListener("state", (event) => console.log(event.detail.state));
 *     client.connect();
 *
 * The protocol it speaks is docs/protocol.rst: a hello, a welcome, then
 * message frames; in ack mode, cumulative `{"type": "ack", "tag": N}` frames
 * back. It reconnects by itself (exponential backoff with full jitter) unless
 * the server refused the hello or a frame for good, and asks for `heartbeat`
 * frames to notice a connection that died without a word (see `idleTimeout`).
 *
 * Messages are handled one at a time, in order: a `message` event, whose
 * listeners may return promises (async functions); the next message waits
 * until they are settled. In ack mode a message is acknowledged only once
 * they all fulfil, and a listener that throws or rejects refuses it (nack):
 * the client closes the socket and reconnects, and the server sends it
 * again, with everything after it. (In plain mode the messages behind a
 * slow listener wait in the page's memory, already counted as delivered;
 * in ack mode `--ack-window` bounds them, and they are not lost with it.)
 *
 * @module redmessenger
 */

/**
 * Close codes after which reconnecting cannot help: the same hello would be
 * refused again (4000 bad_hello, 4001 unauthorized), the client broke the
 * protocol (4002 bad_frame, and the WebSocket protocol errors 1002, 1003,
 * 1007, 1008, 1009, 1010), or the user opened too many sockets and this
 * one, the oldest, was closed to make room (4009 too_many_sockets; coming
 * back would close the next oldest, and so on, around and around). The
 * same list as the server's (redmessenger/frames.py; a test compares them).
 * @type {ReadonlySet<number>}
 */
export const FINAL_CLOSE_CODES = new Set([
  4000, 4001, 4002, 4009, 1002, 1003, 1007, 1008, 1009, 1010,
]);

/**
 * The `error` codes the server sends before those closes: final whatever
 * the close code says, for when the close frame itself is lost (1006).
 * @type {ReadonlySet<string>}
 */
export const FINAL_ERRORS = new Set([
  "bad_hello", "unauthorized", "bad_frame", "too_many_sockets", "binary_frame", "frame_too_big",
]);

/**
 * What the listeners of a `message` event did, by event: the first error
 * one threw, and the promises they returned.
 * @type {WeakMap<Event, {failure: {error: unknown} | undefined, pending: PromiseLike<unknown>[]}>}
 */
const OUTCOMES = new WeakMap();

/**
 * The automatic idle timeout, in heartbeat intervals: a connection on which
 * nothing arrived for 2.5 of the intervals its welcome announced is dead.
 * The server's next heartbeat waits for the pong of its last ping, so they
 * come a round trip later than the interval; 2.5 leaves room for that and
 * for one heartbeat that is missing or late (a busy server, a slow
 * network), not for two.
 * @type {number}
 */
export const HEARTBEATS_MISSED = 2.5;

/**
 * The WebSocket URL of the RedMessenger that served this script: where
 * `client.js` came from, `http:` made `ws:` and `https:` made `wss:`
 * (`/rm/client.js` gives `ws://host/rm/`, for a RedMessenger mounted at
 * `/rm` in an application's site). `undefined` where the script did not
 * come over HTTP (bundled, or outside a browser).
 * @returns {string | undefined}
 */
export function defaultUrl() {
  const here = new URL(".", import.meta.url);
  if (!/^https?:$/.test(here.protocol)) return undefined;
  here.protocol = here.protocol === "https:" ? "wss:" : "ws:";
  return here.href;
}

/**
 * @typedef {object} ClientOptions
 * @property {string} id The user id to say hello as.
 * @property {string | (() => string | Promise<string>)} [key] The user's key
 *   (leave it out with `--auth off`), or a function that returns it, or a
 *   promise of it, called before every connection attempt (for a JWT that
 *   expires, say). A function that throws or rejects counts as a failed
 *   attempt (close code 1006, and an `error` event `key_failed`), tried
 *   again with backoff.
 * @property {number} [keyTimeout=10000] Milliseconds to wait for a key
 *   promise: one that has not settled by then counts as a failed attempt
 *   (an `error` event `key_timeout`, close code 1006), tried again with
 *   backoff. 0: wait for ever.
 * @property {boolean} [ack=false] Ask for ack mode: acknowledge every message
 *   once handled, refuse those whose handling failed.
 * @property {boolean} [reconnect=true] Reconnect after the socket closes
 *   (except for a {@link FINAL_CLOSE_CODES final} code or {@link FINAL_ERRORS error},
 *   or {@link RedMessengerClient#close}).
 * @property {number} [minDelay=250] Backoff base, in milliseconds.
 * @property {number} [maxDelay=30000] Backoff cap, in milliseconds.
 * @property {number} [stableAfter=30000] Milliseconds a connection must stay
 *   up after its welcome for the backoff to start over from `minDelay`; a
 *   server that welcomes and soon closes is retried less and less often.
 * @property {number | null} [idleTimeout=null] Milliseconds without any frame
 *   from the server after which the connection counts as dead: the client
 *   drops it (an `error` event `idle_timeout`, close code 1006) and
 *   reconnects. Browsers hide WebSocket pings from scripts, so the client
 *   asks the server for `heartbeat` frames, which it sends every
 *   `--ping-interval`. Left out (`null`): automatic, {@link HEARTBEATS_MISSED}
 *   times the interval the welcome announces (75 s for the default 30 s),
 *   none before the welcome or from a server that sends no heartbeats. A
 *   number sets it instead (still asking for heartbeats); 0: never, and
 *   no heartbeats are asked for.
 * @property {number} [ackDelay=50] Milliseconds to gather acks into one
 *   frame; 0 acks after every message.
 * @property {number} [dedupSize=10000] How many message ids are remembered
 *   to recognize redeliveries and other copies (in both modes).
 */

/**
 * @typedef {object} MessageDetail The detail of a `message` event.
 * @property {string} id Unique to the message; the same on a redelivery.
 * @property {string} source `rm.users.<uid>` or `rm.groups.<gid>`.
 * @property {number} timestamp Milliseconds since the epoch at which
 *   RedMessenger received the PUBLISH.
 * @property {string} [payload] The payload, when it is UTF-8 text.
 * @property {Uint8Array} [payloadBytes] The payload's bytes, when it is not
 *   (decoded from the frame's `payload_base64`).
 * @property {boolean} bubble `true` on the user's newest socket only: whether
 *   this client should surface the message (a notification, say).
 * @property {boolean} queued `true` if it was stored while the user was away.
 * @property {number} [tag] This socket's number for it (ack mode only).
 * @property {() => void} ack Settle the message now as handled (in ack mode
 *   it is acknowledged); what its listeners do after that does not count.
 *   A listener that called `event.preventDefault()` must call this (or
 *   `nack`) for the next message to be handled.
 * @property {(reason?: string) => void} nack Settle it now as not handled:
 *   in ack mode, the client closes the socket and reconnects (with
 *   backoff), and the server sends it again. In plain mode there is no
 *   second copy: it only ends the message's turn.
 */

/**
 * @typedef {object} StateDetail The detail of a `state` event.
 * @property {"connecting" | "open" | "welcomed" | "closed"} state
 * @property {number} [code] (closed) The close code; 1006 for a connection
 *   that failed or dropped (a key or idle timeout too), 1000 after a nack.
 * @property {string} [reason] (closed) The close reason.
 * @property {boolean} [final] (closed) `true` if the client will not
 *   reconnect by itself.
 * @property {number} [retryIn] (closed, not final) Milliseconds until the
 *   next attempt.
 */

/**
 * A connection to RedMessenger for one user, kept up across drops.
 *
 * Events (all `CustomEvent`s; the payload is in `event.detail`):
 *
 * - `state`: {@link StateDetail}, on every change of {@link RedMessengerClient#state}.
 * - `welcome`: the server's welcome frame (`{type, id, channel, queued, ack,
 *   heartbeat}`).
 * - `message`: {@link MessageDetail}, for every message (once per id), in
 *   its turn. A listener may return a promise (be an async function): the
 *   next message waits for it. The message is settled well once every
 *   listener has returned and every such promise has fulfilled, and badly
 *   as soon as a listener throws or a promise rejects (`handler_failed`;
 *   in ack mode the message is refused and comes again). A listener may
 *   also take the decision itself: `event.preventDefault()`, then
 *   `event.detail.ack()` or `event.detail.nack()` when it knows.
 * - `duplicate`: {@link MessageDetail} of a message whose id was already
 *   handled (a redelivery, or a copy stored twice); it is acknowledged, not
 *   handled again.
 * - `error`: the server's error frame (`{type, code, reason}`), sent just
 *   before it closes the socket; or one of the client's own, of the same
 *   shape: `key_failed`, `key_timeout` (the key function threw, rejected or
 *   took longer than `keyTimeout`), `idle_timeout` (nothing from the server
 *   for the idle timeout), `handler_failed` (a `message` listener failed on
 *   message `id`, also given; in ack mode the message is refused).
 *
 * @extends EventTarget
 */
export class RedMessengerClient extends EventTarget {
  /**
   * @param {string | URL | undefined | ClientOptions} url The WebSocket URL
   *   (`ws://host:port/`); left out (or `undefined`), that of the
   *   RedMessenger that served the page. The options may come first instead.
   * @param {ClientOptions} [options]
   */
  constructor(url, options) {
    super();
    if (url !== null && typeof url === "object" && !(url instanceof URL)) {
      options = url;
      url = undefined;
    }
    const {
      id, key, keyTimeout = 10000, ack = false, reconnect = true, minDelay = 250,
      maxDelay = 30000, stableAfter = 30000, idleTimeout = null, ackDelay = 50, dedupSize = 10000,
    } = options ?? {};
    url = url ?? defaultUrl();
    if (!url) throw new TypeError("RedMessengerClient needs a url where client.js was not served by RedMessenger");
    if (typeof id !== "string" || !id) throw new TypeError("RedMessengerClient needs an id");
    /** @type {string} */ this.url = String(url);
    /** @type {string} */ this.id = id;
    /**
     * The key, or a function returning it (or a promise of it), called
     * before every connection attempt: a way to present a fresh JWT.
     * @type {string | (() => string | Promise<string>) | undefined}
     */
    this.key = key ?? undefined;
    /** @type {number} */ this.keyTimeout = keyTimeout;
    /** @type {boolean} */ this.ack = Boolean(ack);
    /** @type {boolean} */ this.reconnect = Boolean(reconnect);
    /** @type {number} */ this.minDelay = minDelay;
    /** @type {number} */ this.maxDelay = maxDelay;
    /** @type {number} */ this.stableAfter = stableAfter;
    /**
     * Milliseconds of silence that drop a connection; `null`: from the
     * server's heartbeats (see {@link ClientOptions}); 0: never.
     * @type {number | null}
     */
    this.idleTimeout = idleTimeout;
    /** Milliseconds to gather acks; may be changed at any time. @type {number} */
    this.ackDelay = ackDelay;
    /** @type {number} */ this.dedupSize = dedupSize;
    /**
     * `idle` before {@link RedMessengerClient#connect}, then `connecting`,
     * `open` (hello sent), `welcomed`, `closed`.
     * @type {"idle" | "connecting" | "open" | "welcomed" | "closed"}
     */
    this.state = "idle";
    /** The last welcome frame, or `null`. @type {object | null} */
    this.welcome = null;
    /** @type {WebSocket | null} */ this._socket = null;
    /** @type {ReturnType<typeof setTimeout> | null} */ this._retryTimer = null;
    /** @type {ReturnType<typeof setTimeout> | null} */ this._ackTimer = null;
    /** @type {ReturnType<typeof setTimeout> | null} */ this._keyTimer = null;
    /** @type {ReturnType<typeof setTimeout> | null} */ this._idleTimer = null;
    this._generation = 0; // connection attempts so far; close() counts as one
    this._dialing = false; // an attempt is getting its key
    this._attempt = 0; // failed attempts since the last stable connection
    this._wanted = false; // connect() called and close() not since
    this._welcomedAt = null; // performance.now() at this socket's welcome
    this._heardAt = 0; // performance.now() at this socket's last frame
    this._heartbeatIdle = 0; // the automatic idle timeout from this socket's welcome
    this._refusal = null; // the code of this socket's last error frame from the server
    this._lastTag = 0; // highest tag handled on the current socket
    this._ackedTag = 0; // highest tag acknowledged on the current socket
    /** Messages waiting for their turn: `{detail, socket}`. */
    this._inbox = new Queue();
    this._busy = false; // a message is being handled
    /** Ids handled, oldest first (a Set keeps insertion order). */
    this._seen = new Set();
    /** `message` listeners and what they are registered as. */
    this._wrappers = new WeakMap();
  }

  /**
   * `EventTarget.addEventListener`, except that `message` listeners are
   * watched: what they throw or return decides the message's fate.
   * @param {string} type
   * @param {EventListenerOrEventListenerObject | null} listener
   * @param {boolean | AddEventListenerOptions} [options]
   */
  addEventListener(type, listener, options) {
    super.addEventListener(type, type === "message" ? this._watched(listener) : listener, options);
  }

  /**
   * @param {string} type
   * @param {EventListenerOrEventListenerObject | null} listener
   * @param {boolean | EventListenerOptions} [options]
   */
  removeEventListener(type, listener, options) {
    const registered = type === "message" ? this._wrappers.get(listener) ?? listener : listener;
    super.removeEventListener(type, registered, options);
  }

  /**
   * Open the connection (and keep it open, reconnecting as needed). Does
   * nothing if it is already open or being opened.
   */
  connect() {
    this._wanted = true;
    if (this._socket || this._dialing) return;
    this._clearRetry();
    this._attempt = 0;
    this._open();
  }

  /**
   * Close the connection for good (until the next {@link RedMessengerClient#connect}),
   * acknowledging first whatever was handled in ack mode (what was not is
   * sent again on the next connection).
   * @param {number} [code=1000]
   * @param {string} [reason=""]
   */
  close(code = 1000, reason = "") {
    const active = this._socket !== null || this._dialing || this._retryTimer !== null;
    this._wanted = false;
    this._generation += 1; // a key still being fetched is for nothing now
    this._dialing = false;
    this._clearRetry();
    this._clearTimer("_keyTimer");
    const socket = this._socket;
    if (socket) this._hangUp(socket, code, reason);
    if (active) this._setState("closed", { code, reason, final: true });
  }

  // -- the socket ---------------------------------------------------------

  /**
   * One connection attempt: get the key (a function's, fresh each time),
   * then open the socket.
   * @private
   */
  _open() {
    const generation = ++this._generation;
    this._dialing = true;
    this._setState("connecting", {});
    let key;
    try {
      key = typeof this.key === "function" ? this.key() : this.key;
    } catch (error) {
      key = Promise.reject(error);
    }
    if (key !== null && typeof key === "object" && typeof key.then === "function") {
      if (this.keyTimeout > 0) {
        this._keyTimer = setTimeout(() => {
          this._keyTimer = null;
          this._keyFailed(generation, "key_timeout",
            `the key did not come within ${this.keyTimeout} ms`);
        }, this.keyTimeout);
      }
      key.then(
        (value) => this._dial(generation, value),
        (error) => this._keyFailed(generation, "key_failed",
          `could not get the key: ${error?.message ?? error}`),
      );
    } else {
      this._dial(generation, key);
    }
  }

  /**
   * The key of attempt `generation` failed or is late: that attempt is
   * over (a key that comes after all is for nothing).
   * @private
   */
  _keyFailed(generation, code, reason) {
    if (generation !== this._generation || !this._dialing) return;
    this._generation += 1;
    this._dialing = false;
    this._clearTimer("_keyTimer");
    this._emit("error", { type: "error", code, reason });
    this._afterClose(1006, reason);
  }

  /** @private */
  _dial(generation, key) {
    if (generation !== this._generation) return; // closed meanwhile
    this._dialing = false;
    this._clearTimer("_keyTimer");
    const socket = new WebSocket(this.url);
    this._socket = socket;
    this._lastTag = 0;
    this._ackedTag = 0;
    this._welcomedAt = null;
    this._heartbeatIdle = 0;
    this._refusal = null;
    this._heard();
    socket.onopen = () => {
      this._heard();
      /** @type {{id: string, key?: string, ack?: boolean, heartbeat?: boolean}} */
      const hello = { id: this.id };
      if (key !== undefined && key !== null) hello.key = String(key);
      if (this.ack) hello.ack = true;
      if (this.idleTimeout !== 0) hello.heartbeat = true;
      socket.send(JSON.stringify(hello));
      this._setState("open", {});
    };
    socket.onmessage = (event) => {
      this._heard();
      this._frame(event.data);
    };
    socket.onclose = (event) => {
      this._detach(socket);
      this._afterClose(event.code, event.reason, FINAL_ERRORS.has(this._refusal));
    };
    // A failed connection fires "error" and then "close": "close" handles it.
    socket.onerror = null;
  }

  /** @private */
  _detach(socket) {
    socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null;
    if (this._socket === socket) this._socket = null;
    this._clearTimer("_ackTimer");
    this._clearTimer("_idleTimer");
    // In ack mode what this socket brought and was not handled comes again.
    if (this.ack) this._inbox.removeWhere((entry) => entry.socket === socket);
  }

  /**
   * Close a live socket on our side: acknowledge what was handled, stop
   * listening to it (a dead connection may take minutes to report its
   * close), and close it.
   * @private
   */
  _hangUp(socket, code, reason) {
    this._flushAck();
    this._detach(socket);
    try {
      socket.close(code, reason);
    } catch {
      socket.close(); // a code the browser does not let scripts send
    }
  }

  /**
   * Drop the current socket for a reason of the client's own (an `error`
   * event says which), and try again; the `closed` state carries `code`.
   * @private
   */
  _drop(socket, error, code) {
    this._emit("error", error);
    if (this._socket !== socket) return; // already gone (a listener closed it)
    this._hangUp(socket, 1000, error.reason.slice(0, 120));
    this._afterClose(code, error.reason);
  }

  /**
   * A sign of life from the socket: restart the idle countdown.
   * @private
   */
  _heard() {
    this._heardAt = performance.now();
    const limit = this._idleLimit();
    if (limit > 0 && this._idleTimer === null) this._armIdle(limit);
  }

  /**
   * The idle timeout in force: the page's, or the one from the heartbeats.
   * @private
   * @returns {number}
   */
  _idleLimit() {
    return this.idleTimeout ?? this._heartbeatIdle;
  }

  /** @private */
  _armIdle(delay) {
    const socket = this._socket;
    this._idleTimer = setTimeout(() => {
      this._idleTimer = null;
      const limit = this._idleLimit();
      if (this._socket !== socket || limit <= 0) return;
      const quiet = performance.now() - this._heardAt;
      if (quiet < limit) {
        this._armIdle(limit - quiet); // heard meanwhile: wait from then
        return;
      }
      const reason = `idle timeout: nothing from the server for ${Math.round(quiet)} ms`;
      this._drop(socket, { type: "error", code: "idle_timeout", reason }, 1006);
    }, delay);
  }

  /**
   * The attempt or connection is over: stop, or try again after a while.
   * The backoff starts over only after a connection that stayed up for
   * `stableAfter` ms, so that a server that welcomes and then closes is not
   * hammered. `refused`: the server's error frame said the refusal is final.
   * @private
   */
  _afterClose(code, reason, refused = false) {
    if (this._welcomedAt !== null && performance.now() - this._welcomedAt >= this.stableAfter) {
      this._attempt = 0;
    }
    this._welcomedAt = null;
    const final = !this._wanted || !this.reconnect || refused || FINAL_CLOSE_CODES.has(code);
    if (final) {
      this._wanted = false;
      this._setState("closed", { code, reason, final: true });
      return;
    }
    // Full jitter: anywhere between 0 and the exponential ceiling.
    const ceiling = Math.min(this.maxDelay, this.minDelay * 2 ** this._attempt);
    const retryIn = Math.round(Math.random() * ceiling);
    this._attempt += 1;
    this._setState("closed", { code, reason, final: false, retryIn });
    this._retryTimer = setTimeout(() => {
      this._retryTimer = null;
      if (this._wanted && !this._socket && !this._dialing) this._open();
    }, retryIn);
  }

  /** @private */
  _clearRetry() {
    this._clearTimer("_retryTimer");
  }

  /** @private */
  _clearTimer(name) {
    if (this[name] !== null) clearTimeout(this[name]);
    this[name] = null;
  }

  // -- frames -------------------------------------------------------------

  /** @private */
  _frame(data) {
    if (typeof data !== "string") return; // RedMessenger sends text frames only
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    if (frame === null || typeof frame !== "object") return;
    switch (frame.type) {
      case "welcome":
        this._welcomedAt = performance.now();
        this.welcome = frame;
        if (typeof frame.heartbeat === "number" && frame.heartbeat > 0) {
          this._heartbeatIdle = HEARTBEATS_MISSED * frame.heartbeat * 1000;
          this._heard(); // the countdown starts now
        }
        this._setState("welcomed", {});
        this._emit("welcome", frame);
        break;
      case "message":
        this._message(frame);
        break;
      case "error":
        this._refusal = frame.code;
        this._emit("error", frame);
        break;
      case "heartbeat":
        break; // not a message: it only showed that the connection lives
      default:
        break; // unknown frames are for newer clients
    }
  }

  /** @private */
  _message(frame) {
    /** @type {MessageDetail} */
    const detail = {
      id: frame.id,
      source: frame.source,
      timestamp: frame.timestamp,
      bubble: frame.bubble,
      queued: frame.queued,
    };
    if (typeof frame.payload_base64 === "string") {
      detail.payloadBytes = decodeBase64(frame.payload_base64);
    } else {
      detail.payload = frame.payload;
    }
    if (Number.isInteger(frame.tag)) detail.tag = frame.tag;
    this._inbox.push({ detail, socket: this._socket });
    this._process();
  }

  /**
   * Hand messages over, one at a time: a message whose handling has not
   * settled holds back the next one (and, in ack mode, its ack).
   * @private
   */
  _process() {
    while (!this._busy && this._inbox.length > 0) this._handle(this._inbox.shift());
  }

  /**
   * One message's turn: a `duplicate` event, or a `message` event settled
   * by what its listeners did.
   * @private
   */
  _handle(entry) {
    const { detail } = entry;
    let settled = false;
    let inTurn = true;
    const settle = (ok, error) => {
      if (settled) return;
      settled = true;
      this._busy = false;
      this._settled(entry, ok, error);
      if (!inTurn) this._process();
    };
    Object.defineProperties(detail, {
      ack: { value: () => settle(true), configurable: true },
      nack: { value: (reason) => settle(false, reason ?? "refused"), configurable: true },
    });
    this._busy = true;
    if (typeof detail.id === "string" && this._seen.has(detail.id)) {
      this._emit("duplicate", detail);
      settle(true);
    } else {
      const { held, failure, pending } = this._dispatchMessage(detail);
      if (failure !== undefined) {
        settle(false, failure.error);
      } else if (pending.length > 0) {
        Promise.all(pending).then(() => held || settle(true), (error) => settle(false, error));
      } else if (!held) {
        settle(true);
      }
    }
    inTurn = false;
  }

  /**
   * The `message` event, with what its listeners threw or returned.
   * @private
   * @returns {{held: boolean, failure: {error: unknown} | undefined, pending: PromiseLike<unknown>[]}}
   */
  _dispatchMessage(detail) {
    const event = new CustomEvent("message", { detail, cancelable: true });
    const outcome = { failure: undefined, pending: [] };
    OUTCOMES.set(event, outcome);
    this.dispatchEvent(event);
    return { held: event.defaultPrevented, ...outcome };
  }

  /**
   * What a `message` listener is registered as: the listener, called the
   * same way, noting what it throws (then thrown on, for the browser to
   * report as usual) or the promise it returns.
   * @private
   */
  _watched(listener) {
    if (listener === null || (typeof listener !== "function" && typeof listener !== "object")) {
      return listener;
    }
    let watched = this._wrappers.get(listener);
    if (watched === undefined) {
      watched = function watchedListener(event) {
        const outcome = OUTCOMES.get(event);
        let result;
        try {
          result = typeof listener === "function"
            ? listener.call(this, event) : listener.handleEvent(event);
        } catch (error) {
          if (outcome) outcome.failure ??= { error };
          throw error;
        }
        if (outcome && result !== null && typeof result === "object"
            && typeof result.then === "function") {
          outcome.pending.push(result);
        }
      };
      this._wrappers.set(listener, watched);
    }
    return watched;
  }

  /**
   * A message's turn is over: remember it and acknowledge it, or refuse it.
   * @private
   */
  _settled({ detail, socket }, ok, error) {
    if (ok) {
      this._remember(detail.id);
      if (socket === this._socket && detail.tag > this._lastTag) {
        this._lastTag = detail.tag;
        this._scheduleAck();
      }
      return;
    }
    const reason = `handling message ${detail.id} failed: ${error?.message ?? error}`;
    const failed = { type: "error", code: "handler_failed", reason, id: detail.id };
    if (this.ack && socket === this._socket) {
      this._drop(socket, failed, 1000); // nack: it comes again, with all after it
    } else {
      this._emit("error", failed);
    }
  }

  /**
   * Remember a handled message id, forgetting the oldest past `dedupSize`.
   * @private
   * @param {string} id
   */
  _remember(id) {
    if (typeof id !== "string") return;
    this._seen.delete(id);
    this._seen.add(id);
    while (this._seen.size > this.dedupSize) {
      this._seen.delete(this._seen.values().next().value);
    }
  }

  // -- acks ---------------------------------------------------------------

  /** @private */
  _scheduleAck() {
    if (this.ackDelay <= 0) {
      this._flushAck();
    } else if (this._ackTimer === null) {
      this._ackTimer = setTimeout(() => {
        this._ackTimer = null;
        this._flushAck();
      }, this.ackDelay);
    }
  }

  /** @private */
  _flushAck() {
    this._clearTimer("_ackTimer");
    const socket = this._socket;
    if (!socket || socket.readyState !== WebSocket.OPEN || this._lastTag <= this._ackedTag) {
      return;
    }
    socket.send(JSON.stringify({ type: "ack", tag: this._lastTag }));
    this._ackedTag = this._lastTag;
  }

  // -- events -------------------------------------------------------------

  /** @private */
  _setState(state, extra) {
    this.state = state;
    this._emit("state", { state, ...extra });
  }

  /** @private */
  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

/**
 * The bytes of a base64 string.
 * @param {string} text
 * @returns {Uint8Array}
 */
export function decodeBase64(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i += 1) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

/**
 * A first-in first-out queue whose `shift` does not copy the array (a slow
 * handler may have many messages waiting).
 * @private
 */
class Queue {
  constructor() {
    this._items = [];
    this._head = 0;
  }

  get length() {
    return this._items.length - this._head;
  }

  push(item) {
    this._items.push(item);
  }

  shift() {
    const item = this._items[this._head];
    this._items[this._head] = undefined;
    this._head += 1;
    if (this._head * 2 >= this._items.length) {
      this._items = this._items.slice(this._head);
      this._head = 0;
    }
    return item;
  }

  removeWhere(predicate) {
    this._items = this._items.slice(this._head).filter((item) => !predicate(item));
    this._head = 0;
  }
}
