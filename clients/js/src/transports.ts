/**
 * The three /notify transports behind one small interface: each opens one connection, hands
 * every event over, and says once how it ended. Reconnecting is the connection's business
 * (connection.ts), not theirs.
 */
import { unwrap } from './http';
import type { NotifyEvent, TransportName } from './types';

/** How a transport ended. */
export interface TransportEnd {
  /** It had delivered `ready` (a failure to open counts towards falling back). */
  opened: boolean;
  /** WebSocket close code, when there was one. */
  code?: number;
  /** HTTP status of a refused long-poll. */
  status?: number;
  /** The server said `kicked`: do not reconnect. */
  kicked?: boolean;
  /** The token expired (WebSocket 4001, long-poll 401): renew, then reconnect. */
  tokenExpired?: boolean;
  /** For logs and the `state` event. */
  reason: string;
}

export interface TransportHandlers {
  event(ev: NotifyEvent): void;
  ended(end: TransportEnd): void;
}

export interface OpenParams {
  baseUrl: string;
  /** A single-use ticket (WebSocket and SSE, which cannot send headers). */
  ticket?: string;
  /** The current token (long-poll, which sends it in a header). */
  token: () => Promise<string>;
  /** The last cursor, read when the transport opens (and before every poll). */
  cursor: () => string | null;
  pollTimeoutS: number;
  fetchFn: typeof fetch;
}

export interface Transport {
  readonly name: TransportName;
  /** Closes it; no more events nor `ended` after this. */
  close(): void;
}

/** The SSE and WebSocket event names a client listens for. */
export const EVENT_TYPES = ['ready', 'message', 'cursor', 'resync', 'kicked', 'read', 'signal', 'presence', 'stream'];

function query(params: Record<string, string | null | undefined>): string {
  return Object.entries(params)
    .filter(([, v]) => v != null && v !== '')
    .map(([k, v]) => `${k}=${encodeURIComponent(v as string)}`)
    .join('&');
}

function parse(data: unknown): NotifyEvent | null {
  if (typeof data !== 'string') return null;
  try {
    const ev = JSON.parse(data);
    return ev && typeof ev.type === 'string' ? ev : null;
  } catch {
    return null;
  }
}

/** A WebSocket, `?protoc=ws&ticket=…&cursor=…`. */
export function openWs(p: OpenParams, h: TransportHandlers): Transport {
  const url = p.baseUrl.replace(/^http/, 'ws') + '/notify?' + query({ protoc: 'ws', ticket: p.ticket, cursor: p.cursor() });
  let opened = false;
  let done = false;
  const ws = new WebSocket(url);
  const end = (e: TransportEnd) => {
    if (done) return;
    done = true;
    h.ended(e);
  };
  ws.onmessage = (m) => {
    if (done) return;
    const ev = parse(m.data);
    if (!ev) return;
    if (ev.type === 'ready') opened = true;
    h.event(ev);
  };
  ws.onclose = (c) => {
    end({
      opened,
      code: c.code,
      kicked: c.code === 4000,
      tokenExpired: c.code === 4001,
      reason: `websocket closed (${c.code}${c.reason ? ' ' + c.reason : ''})`,
    });
  };
  return {
    name: 'ws',
    close() {
      done = true;
      ws.onmessage = null;
      ws.onclose = null;
      try {
        ws.close(1000);
      } catch {
        /* already closed */
      }
    },
  };
}

/** An EventSource, `?protoc=sse&ticket=…&last_event_id=…`; closed on its first error. */
export function openSse(p: OpenParams, h: TransportHandlers): Transport {
  const url = p.baseUrl + '/notify?' + query({ protoc: 'sse', ticket: p.ticket, last_event_id: p.cursor() });
  let opened = false;
  let kicked = false;
  let done = false;
  const es = new EventSource(url);
  const onEvent = (m: MessageEvent) => {
    if (done) return;
    const ev = parse(m.data);
    if (!ev) return;
    if (ev.type === 'ready') opened = true;
    if (ev.type === 'kicked') kicked = true;
    h.event(ev);
  };
  for (const type of EVENT_TYPES) es.addEventListener(type, onEvent as EventListener);
  // A ticket is good for one connection: the EventSource's own retry would be refused, so
  // the first error ends it and the connection opens a new one with a fresh ticket.
  es.onerror = () => {
    if (done) return;
    done = true;
    es.close();
    h.ended({ opened, kicked, reason: opened ? 'event stream ended' : 'event stream failed to open' });
  };
  return {
    name: 'sse',
    close() {
      done = true;
      es.close();
    },
  };
}

/** Long-polls with `fetch` (the token in a header), one after another, until closed. */
export function openPoll(p: OpenParams, h: TransportHandlers): Transport {
  const abort = new AbortController();
  let done = false;
  let opened = false;
  const end = (e: TransportEnd) => {
    if (done) return;
    done = true;
    h.ended(e);
  };
  (async () => {
    while (!done) {
      const cursor = p.cursor();
      // The first poll answers at once (a resumed poll has no `ready` to wait for): the
      // transport is open when it answers; the next ones wait for events.
      const wait = opened ? String(p.pollTimeoutS) : '0';
      const url = p.baseUrl + '/notify?' + query({ protoc: 'poll', cursor, timeout: cursor ? wait : null });
      let res: Response;
      try {
        const token = await p.token();
        res = await p.fetchFn(url, { headers: { Authorization: `Bearer ${token}` }, signal: abort.signal, cache: 'no-store' });
      } catch (e) {
        end({ opened, reason: `poll failed: ${e instanceof Error ? e.message : String(e)}` });
        return;
      }
      if (done) return;
      if (res.status === 401) {
        end({ opened, status: 401, tokenExpired: true, reason: 'poll refused: token' });
        return;
      }
      let data: { events: NotifyEvent[]; cursor: string };
      try {
        data = await unwrap(res);
      } catch (e) {
        end({ opened, status: res.status, reason: `poll refused: ${e instanceof Error ? e.message : String(e)}` });
        return;
      }
      for (const ev of data.events) {
        if (done) return;
        if (ev.type === 'ready') opened = true;
        h.event(ev);
        if (ev.type === 'kicked') {
          end({ opened, kicked: true, reason: 'kicked' });
          return;
        }
      }
      if (done) return;
      if (!opened) {
        opened = true;
        h.event({ type: 'ready', cursor: data.cursor });
      }
      // An answer moves the cursor even without events.
      h.event({ type: 'cursor', cursor: data.cursor });
    }
  })();
  return {
    name: 'poll',
    close() {
      done = true;
      abort.abort();
    },
  };
}

export const TRANSPORTS: Record<TransportName, (p: OpenParams, h: TransportHandlers) => Transport> = {
  ws: openWs,
  sse: openSse,
  poll: openPoll,
};
