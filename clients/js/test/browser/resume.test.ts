// Exact resume in a real Chromium: the page's network is cut (every connection reset, every
// new one refused) while messages are sent; when it comes back the page gets every missed
// message once, in order, on each transport. And a send whose answer is lost is retried
// with its key and stored once.
import type { Page } from 'playwright-core';
import { describe, expect, it } from 'vitest';
import { gotIds, NetworkCut, pageClient, recorded, sleep, until, useServerAndBrowser } from './harness';

const env = useServerAndBrowser();

async function pageVia(url: string): Promise<Page> {
  const page = await (await env.browser.newContext()).newPage();
  await page.goto(`${url}/demo/`);
  return page;
}

describe('a page whose network is cut', () => {
  for (const transport of ['ws', 'sse', 'poll']) {
    it(`gets every message sent meanwhile, once, over ${transport}`, async () => {
      const user = `cut-${transport}`;
      const room = `room-cut-${transport}`;
      await env.server.inner('create_conversation', {
        conversation_id: room,
        conversation_type: 1,
        members: [user, 'sender'],
      });
      const net = await NetworkCut.start(env.server.url);
      const page = await pageVia(net.url);
      await pageClient(page, { user, transports: [transport] });
      await until('connected', async () => (await recorded(page)).state === 'connected');

      const before = await env.server.sendMany(room, 'sender', 'before', 10);
      await until('the first 10', async () => (await gotIds(page, room)).length === 10);

      net.down();
      await until('the page to notice', async () => (await recorded(page)).state !== 'connected', 15_000);
      const during = await env.server.sendMany(room, 'sender', 'during', 40);
      await sleep(1_000);
      expect(await gotIds(page, room)).toEqual(before);
      net.up();
      const restored = Date.now();
      await until('the missed messages', async () => (await gotIds(page, room)).length >= 50, 30_000);
      console.log(`${transport}: the 40 missed messages arrived ${Date.now() - restored} ms after the network came back`);

      const after = await env.server.sendMany(room, 'sender', 'after', 10);
      const all = [...before, ...during, ...after];
      await until('every message', async () => (await gotIds(page, room)).length >= all.length, 30_000);
      await sleep(500);
      // Each exactly once, in order (the created message came before this page connected).
      expect(await gotIds(page, room)).toEqual(all);
      const r = await recorded(page);
      expect(r.transport).toBe(transport);
      expect(r.states.some((s) => s.state === 'disconnected')).toBe(true);

      // A cut while nothing is sent: the page is connected again soon after, quiet as it is.
      net.down();
      await until('the page to notice', async () => (await recorded(page)).state !== 'connected', 15_000);
      net.up();
      const back = Date.now();
      await until('connected again', async () => (await recorded(page)).state === 'connected', 4_000);
      console.log(`${transport}: connected again ${Date.now() - back} ms after a quiet cut ended`);
      await page.context().close();
      await net.stop();
    });
  }
});

describe('a send whose answer is lost', () => {
  it('is retried with the same client_msg_id and stored once', async () => {
    const user = 'retrier';
    const room = 'room-retry';
    await env.server.inner('create_conversation', { conversation_id: room, conversation_type: 1, members: [user] });
    const page = await pageVia(env.server.url);
    await pageClient(page, { user, transports: ['ws'] });
    let cut = 0;
    // The first /send_msg reaches the server (and is stored), then its answer is lost.
    await page.route('**/send_msg', async (route) => {
      if (cut === 0) {
        cut += 1;
        await route.fetch();
        await route.abort('connectionreset');
      } else {
        await route.continue();
      }
    });
    const sent = await page.evaluate(async (room) => {
      const m = await (window as any).t.client.send(room, 'exactly once', { clientMsgId: 'key-1' });
      return { msg_id: m.msg_id, client_msg_id: m.client_msg_id };
    }, room);
    expect(cut).toBe(1);
    expect(sent.client_msg_id).toBe('key-1');
    const history = await page.evaluate(async (room) => (window as any).t.client.history(room), room);
    const copies = history.filter((m: { content: string }) => m.content === 'exactly once');
    expect(copies.map((m: { msg_id: number }) => m.msg_id)).toEqual([sent.msg_id]);
    await page.context().close();
  });
});
