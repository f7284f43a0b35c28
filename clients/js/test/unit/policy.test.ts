// The reconnect policy against fake transports (no server): close codes, fallback, tokens,
// deduplication, backoff.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { QuickimClient, backoffDelay, decodeToken } from '../../src/index';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function token(sub: string, expInS: number): string {
  const b64 = (o: object) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return `${b64({ alg: 'HS256' })}.${b64({ sub, exp: Math.floor(Date.now() / 1000) + expInS })}.sig`;
}

/** A WebSocket the test drives: `opened` lists every socket the client made. */
class FakeSocket {
  static made: FakeSocket[] = [];
  onmessage: ((m: { data: string }) => void) | null = null;
  onclose: ((c: { code: number; reason: string }) => void) | null = null;
  closed = false;
  constructor(readonly url: string) {
    FakeSocket.made.push(this);
  }
  send(ev: object) {
    this.onmessage?.({ data: JSON.stringify(ev) });
  }
  serverClose(code: number) {
    this.onclose?.({ code, reason: '' });
  }
  close() {
    this.closed = true;
  }
}

/** An EventSource the test drives. */
class FakeEventSource {
  static made: FakeEventSource[] = [];
  onerror: (() => void) | null = null;
  listeners = new Map<string, (m: { data: string }) => void>();
  constructor(readonly url: string) {
    FakeEventSource.made.push(this);
  }
  addEventListener(type: string, f: (m: { data: string }) => void) {
    this.listeners.set(type, f);
  }
  close() {}
}

let tickets = 0;
const fakeFetch = (async (url: string) => {
  if (String(url).endsWith('/notify_ticket')) {
    tickets += 1;
    return new Response(JSON.stringify({ code: 0, data: { ticket: `t${tickets}` } }), { status: 200 });
  }
  return new Response(JSON.stringify({ code: 40400, error: 'no' }), { status: 404 });
}) as typeof fetch;

beforeEach(() => {
  FakeSocket.made = [];
  FakeEventSource.made = [];
  tickets = 0;
  (globalThis as any).WebSocket = FakeSocket;
  (globalThis as any).EventSource = FakeEventSource;
});
afterEach(() => {
  delete (globalThis as any).WebSocket;
  delete (globalThis as any).EventSource;
});

async function connected(getToken: () => string = () => token('u', 3600), extra = {}) {
  const client = new QuickimClient({
    url: 'http://gw',
    getToken,
    fetch: fakeFetch,
    tabs: 'single',
    backoff: { baseMs: 20, maxMs: 40 },
    ...extra,
  });
  const got: number[] = [];
  client.on('message', (m) => got.push(m.msg_id));
  await client.connect();
  await until(() => FakeSocket.made.length === 1);
  FakeSocket.made[0].send({ type: 'ready', cursor: 'c0' });
  return { client, got };
}

async function until(check: () => boolean, ms = 2_000) {
  const end = Date.now() + ms;
  while (!check()) {
    if (Date.now() > end) throw new Error('timed out');
    await sleep(5);
  }
}

const msg = (id: number, cursor: string) => ({
  type: 'message',
  cursor,
  message: { conversation_id: 'r', msg_id: id, from: 'x', type: 1, content: '', send_time: 0 },
});

describe('reconnect policy', () => {
  it('resumes from the last cursor after a shutdown (1001), with a fresh ticket', async () => {
    const { client } = await connected();
    FakeSocket.made[0].send(msg(5, 'c5'));
    FakeSocket.made[0].serverClose(1001);
    expect(client.state).toBe('disconnected');
    await until(() => FakeSocket.made.length === 2);
    expect(FakeSocket.made[1].url).toBe('ws://gw/notify?protoc=ws&ticket=t2&cursor=c5');
    client.disconnect();
  });

  it('does not reconnect after kicked (4000)', async () => {
    const { client } = await connected();
    let kicked = 0;
    client.on('kicked', () => (kicked += 1));
    FakeSocket.made[0].serverClose(4000);
    await sleep(200);
    expect(kicked).toBe(1);
    expect(FakeSocket.made.length).toBe(1);
    expect(client.state).toBe('disconnected');
  });

  it('renews the token on 4001 and reconnects at once', async () => {
    let asked = 0;
    const { client } = await connected(() => {
      asked += 1;
      return token('u', 3600);
    });
    FakeSocket.made[0].serverClose(4001);
    await until(() => FakeSocket.made.length === 2);
    expect(asked).toBe(2);
    client.disconnect();
  });

  it('falls back to SSE after two failures to open, keeping the cursor', async () => {
    const { client } = await connected();
    FakeSocket.made[0].send(msg(1, 'c1'));
    FakeSocket.made[0].serverClose(1006); // was open: not a failure to open
    await until(() => FakeSocket.made.length === 2);
    FakeSocket.made[1].serverClose(1006);
    await until(() => FakeSocket.made.length === 3);
    FakeSocket.made[2].serverClose(1006);
    await until(() => FakeEventSource.made.length === 1);
    expect(FakeEventSource.made[0].url).toBe('http://gw/notify?protoc=sse&ticket=t4&last_event_id=c1');
    expect(client.transport).toBe('sse');
    client.disconnect();
  });

  it('reconnects at once when the browser comes back online or the page becomes visible', async () => {
    const win = new EventTarget();
    const doc = Object.assign(new EventTarget(), { visibilityState: 'visible' });
    (globalThis as any).window = win;
    (globalThis as any).document = doc;
    const random = Math.random;
    Math.random = () => 0.99; // the backoff would wait about a minute
    try {
      const { client } = await connected(undefined, { backoff: { baseMs: 60_000, maxMs: 60_000 } });
      FakeSocket.made[0].serverClose(1006);
      await sleep(50);
      expect(FakeSocket.made.length).toBe(1);
      expect(client.state).toBe('disconnected');
      win.dispatchEvent(new Event('online'));
      await until(() => FakeSocket.made.length === 2);
      FakeSocket.made[1].serverClose(1006);
      await sleep(50);
      expect(FakeSocket.made.length).toBe(2);
      doc.dispatchEvent(new Event('visibilitychange'));
      await until(() => FakeSocket.made.length === 3);
      client.disconnect();
    } finally {
      Math.random = random;
      delete (globalThis as any).window;
      delete (globalThis as any).document;
    }
  });

  it('waits for the backoff when a fresh token is refused again before ready', async () => {
    const random = Math.random;
    Math.random = () => 0.99;
    try {
      let asked = 0;
      const { client } = await connected(
        () => {
          asked += 1;
          return token('u', 3600);
        },
        { backoff: { baseMs: 60_000, maxMs: 60_000 } },
      );
      FakeSocket.made[0].serverClose(4001); // after ready: renew, reconnect at once
      await until(() => FakeSocket.made.length === 2);
      FakeSocket.made[1].serverClose(4001); // refused again before ready: no tight loop
      await sleep(200);
      expect(FakeSocket.made.length).toBe(2);
      expect(client.state).toBe('disconnected');
      expect(asked).toBe(3);
      client.disconnect();
    } finally {
      Math.random = random;
    }
  });

  it('forgets what it delivered after a resync (another database starts its msg_ids again)', async () => {
    const { client, got } = await connected();
    FakeSocket.made[0].send(msg(7, 'c7'));
    FakeSocket.made[0].send({ type: 'resync', cursor: 'd0', reason: 'cursor_from_another_database' });
    FakeSocket.made[0].send(msg(2, 'd2'));
    expect(got).toEqual([7, 2]);
    client.disconnect();
  });

  it('delivers each (conversation, msg_id) once across a resume', async () => {
    const { client, got } = await connected();
    FakeSocket.made[0].send(msg(1, 'c1'));
    FakeSocket.made[0].send(msg(2, 'c2'));
    FakeSocket.made[0].serverClose(4008);
    await until(() => FakeSocket.made.length === 2);
    const s = FakeSocket.made[1];
    s.send({ type: 'ready', cursor: 'c1' });
    s.send(msg(2, 'c2'));
    s.send(msg(3, 'c3'));
    expect(got).toEqual([1, 2, 3]);
    expect(client.cursor).toBe('c3');
    client.disconnect();
  });
});

describe('parts', () => {
  it('backoff has full jitter under a doubling ceiling, capped', () => {
    expect(backoffDelay(0, { baseMs: 500 }, () => 0.999)).toBe(499);
    expect(backoffDelay(3, { baseMs: 500 }, () => 0.5)).toBe(2000);
    expect(backoffDelay(20, { baseMs: 500, maxMs: 30_000 }, () => 0.999)).toBe(29_970);
    expect(backoffDelay(5, {}, () => 0)).toBe(0);
  });

  it('reads a token’s user and expiry', () => {
    const t = token('alice', 60);
    expect(decodeToken(t)?.sub).toBe('alice');
    expect(decodeToken('not a token')).toBeNull();
  });
});
