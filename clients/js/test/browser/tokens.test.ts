// Tokens that expire every few seconds: the client renews them (getToken) before they expire
// and when a stream is closed for an expired token, and resumes without losing a message.
import { describe, expect, it } from 'vitest';
import { gotIds, pageClient, recorded, sleep, until, useServerAndBrowser } from './harness';

const env = useServerAndBrowser();

describe('token expiry', () => {
  for (const transport of ['ws', 'sse', 'poll']) {
    it(`renews the token and loses nothing over ${transport}`, async () => {
      const user = `short-${transport}`;
      const room = `room-token-${transport}`;
      await env.server.inner('create_conversation', { conversation_id: room, conversation_type: 1, members: [user, 'sender'] });
      const page = await (await env.browser.newContext()).newPage();
      await page.goto(`${env.server.url}/demo/`);
      await pageClient(page, { user, transports: [transport], ttl: 3 });
      await until('connected', async () => (await recorded(page)).state === 'connected');
      // 10 s of messages across three token lifetimes (and the server's 5 s leeway).
      const sent: number[] = [];
      const end = Date.now() + 10_000;
      while (Date.now() < end) {
        sent.push(...(await env.server.sendMany(room, 'sender', 'tick', 1)));
        await sleep(100);
      }
      await until('every message', async () => (await gotIds(page, room)).length >= sent.length, 20_000);
      await sleep(300);
      expect(await gotIds(page, room)).toEqual(sent);
      const r = await recorded(page);
      expect(r.tokens).toBeGreaterThanOrEqual(3);
      if (transport === 'poll') {
        // Every poll carries the current token: renewed before it expires, none is refused.
        expect(r.states.filter((s) => s.state === 'disconnected')).toEqual([]);
      } else {
        // A stream ends when the token it opened with expires; the client came back at once.
        const downs = r.states.filter((s) => s.state === 'disconnected');
        expect(downs.length).toBeGreaterThanOrEqual(1);
        expect(downs.every((s) => s.reason === 'token expired')).toBe(true);
      }
      // The stream may be between two tokens right now; it is back within moments.
      await until('connected at the end', async () => (await recorded(page)).state === 'connected', 5_000);
      await page.context().close();
    });
  }
});
