// The browser tests' parts: the real quickim binary (standalone), a TCP proxy that can cut
// the network, and Debian's Chromium driven by playwright-core.
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { type Browser, type Page, chromium } from 'playwright-core';
import { afterAll, beforeAll } from 'vitest';

const here = path.dirname(fileURLToPath(import.meta.url));
export const ROOT = path.resolve(here, '../../../..');
export const BIN = process.env.QUICKIM_BIN ?? path.join(ROOT, 'target/debug/quickim');
export const DEMO_DIR = path.resolve(here, '../../dist/demo');
// Screenshots go to a temporary folder unless QUICKIM_SCREENSHOTS names one (relative to the
// repository): `QUICKIM_SCREENSHOTS=docs/img npm test` refreshes the docs' pictures.
export const SCREENSHOTS = process.env.QUICKIM_SCREENSHOTS
  ? path.resolve(ROOT, process.env.QUICKIM_SCREENSHOTS)
  : path.join(tmpdir(), 'quickim-screenshots');

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
    s.on('error', reject);
  });
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Waits until `check` answers true (polling), or fails with `what`. */
export async function until(what: string, check: () => Promise<boolean> | boolean, timeoutMs = 30_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    if (await check()) return;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(100);
  }
}

/** `quickim standalone` on free ports, with its own data directory. */
export class Server {
  private constructor(
    private readonly child: ChildProcess,
    private readonly dir: string,
    readonly url: string,
    readonly innerUrl: string,
    readonly key: string,
  ) {}

  static async start(env: Record<string, string> = {}): Promise<Server> {
    const dir = mkdtempSync(path.join(tmpdir(), 'quickim-js-'));
    const [pub, inner] = [await freePort(), await freePort()];
    const child = spawn(BIN, ['standalone'], {
      env: {
        ...process.env,
        QUICKIM_DATA_DIR: dir,
        QUICKIM_PUBLIC_ADDR: `127.0.0.1:${pub}`,
        QUICKIM_INNER_ADDR: `127.0.0.1:${inner}`,
        QUICKIM_DEMO_DIR: DEMO_DIR,
        QUICKIM_LOG: 'warn',
        ...env,
      },
      stdio: ['ignore', 'ignore', 'inherit'],
    });
    const url = `http://127.0.0.1:${pub}`;
    await until('quickim to be ready', async () => {
      if (child.exitCode !== null) throw new Error(`quickim exited with ${child.exitCode}`);
      try {
        return (await fetch(`${url}/readyz`)).ok;
      } catch {
        return false;
      }
    });
    const key = readFileSync(path.join(dir, 'inner_key'), 'utf8').trim();
    return new Server(child, dir, url, `http://127.0.0.1:${inner}`, key);
  }

  /** An /inner call; answers `data` or throws. */
  async inner<T = any>(route: string, body: unknown): Promise<T> {
    const res = await fetch(`${this.innerUrl}/inner/${route}`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${this.key}`, 'Content-Type': 'application/json' },
      body: JSON.stringify(body),
    });
    const json = await res.json();
    if (json.code !== 0) throw new Error(`/inner/${route}: ${JSON.stringify(json)}`);
    return json.data;
  }

  /** Sends `n` messages one after another from `from`; answers their msg_ids. */
  async sendMany(conversation: string, from: string, prefix: string, n: number): Promise<number[]> {
    const ids = [];
    for (let i = 0; i < n; i++) {
      const m = await this.inner('send_msg', { conversation_id: conversation, from, type: 1, content: `${prefix}-${i}` });
      ids.push(m.msg_id);
    }
    return ids;
  }

  /** How many /notify connections `user` has on the node. */
  async connections(user: string): Promise<number> {
    const answer = await this.inner('get_users_online', { user_ids: [user] });
    return answer.users[0].connections;
  }

  async stop(): Promise<void> {
    if (this.child.exitCode === null) {
      const exited = new Promise((r) => this.child.once('exit', r));
      this.child.kill('SIGTERM');
      await exited;
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** A TCP proxy in front of the server whose network can be cut: every open connection reset,
 *  every new one refused, until it is restored. */
export class NetworkCut {
  private readonly sockets = new Set<net.Socket>();
  private cut = false;
  private constructor(
    private readonly server: net.Server,
    readonly url: string,
  ) {}

  static async start(targetUrl: string): Promise<NetworkCut> {
    const target = new URL(targetUrl);
    const port = await freePort();
    let proxy: NetworkCut | null = null;
    const server = net.createServer((client) => {
      if (!proxy || proxy.cut) {
        client.resetAndDestroy();
        return;
      }
      const upstream = net.connect(Number(target.port), target.hostname);
      for (const s of [client, upstream]) {
        proxy.sockets.add(s);
        s.on('close', () => proxy?.sockets.delete(s));
        s.on('error', () => {
          client.destroy();
          upstream.destroy();
        });
      }
      client.pipe(upstream);
      upstream.pipe(client);
    });
    await new Promise<void>((r) => server.listen(port, '127.0.0.1', r));
    proxy = new NetworkCut(server, `http://127.0.0.1:${port}`);
    return proxy;
  }

  /** Cuts the network: what is open is reset, what comes is refused. */
  down(): void {
    this.cut = true;
    for (const s of this.sockets) s.resetAndDestroy();
    this.sockets.clear();
  }

  up(): void {
    this.cut = false;
  }

  async stop(): Promise<void> {
    this.down();
    await new Promise((r) => this.server.close(r));
  }
}

export function launch(): Promise<Browser> {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-dev-shm-usage'],
  });
}

export interface PageClientOptions {
  user: string;
  transports?: string[];
  tabs?: 'shared' | 'single';
  ttl?: number;
  upgradeAfterMs?: number;
  storage?: boolean;
}

/**
 * Makes a client in the page (the built module, as an application imports it) whose events
 * are recorded in `window.t`: `got` [conversation, msg_id, content] per message event,
 * `states`, `resyncs`, `tokens` (getToken calls).
 */
export async function pageClient(page: Page, options: PageClientOptions): Promise<void> {
  // A string, so the test runner's transform leaves the page's import() alone.
  await page.evaluate("import('/demo/quickim.js').then((m) => { window.quickim = m; })");
  await page.evaluate(async (o) => {
    const { QuickimClient, localStorageCursor } = (window as any).quickim;
    const t: any = { got: [], states: [], resyncs: [], tokens: 0, kicked: 0 };
    (window as any).t = t;
    const client = new QuickimClient({
      getToken: async () => {
        t.tokens += 1;
        const res = await fetch('/demo/token', { method: 'POST', body: JSON.stringify({ user_id: o.user, ttl_s: o.ttl }) });
        return (await res.json()).data.token;
      },
      transports: o.transports,
      tabs: o.tabs ?? 'single',
      upgradeAfterMs: o.upgradeAfterMs,
      backoff: { baseMs: 200, maxMs: 1500 },
      openTimeoutMs: 5000,
      cursorStorage: o.storage ? localStorageCursor() : undefined,
    });
    client.on('message', (m: any) => t.got.push([m.conversation_id, m.msg_id, m.content]));
    client.on('state', (s: any) => t.states.push(s));
    client.on('kicked', () => (t.kicked += 1));
    client.on('resync', async (e: any) => {
      t.resyncs.push(e.reason);
      t.reloaded = await e.reload();
    });
    t.client = client;
    await client.connect();
  }, options);
}

/** What the page's client recorded. */
export function recorded(page: Page): Promise<{
  got: [string, number, string][];
  states: { state: string; transport: string | null; leader: boolean; reason?: string }[];
  resyncs: string[];
  tokens: number;
  reloaded?: { conversation_id: string; last_msg_id: number }[];
  state: string;
  transport: string | null;
  leader: boolean;
}> {
  return page.evaluate(() => {
    const t = (window as any).t;
    return {
      got: t.got,
      states: t.states,
      resyncs: t.resyncs,
      tokens: t.tokens,
      reloaded: t.reloaded,
      state: t.client.state,
      transport: t.client.transport,
      leader: t.client.isLeader,
    };
  });
}

/** The msg_ids the page got in `conversation`, in the order it got them. */
export async function gotIds(page: Page, conversation: string): Promise<number[]> {
  const r = await recorded(page);
  return r.got.filter(([c]) => c === conversation).map(([, id]) => id);
}

export function screenshotPath(name: string): string {
  mkdirSync(SCREENSHOTS, { recursive: true });
  return path.join(SCREENSHOTS, name);
}

/** A test file's server and browser: started before its tests, stopped after them. */
export function useServerAndBrowser(env: Record<string, string> = {}): { server: Server; browser: Browser } {
  const parts = {} as { server: Server; browser: Browser };
  beforeAll(async () => {
    parts.server = await Server.start(env);
    parts.browser = await launch();
  });
  afterAll(async () => {
    await parts.browser?.close();
    await parts.server?.stop();
  });
  return parts;
}
