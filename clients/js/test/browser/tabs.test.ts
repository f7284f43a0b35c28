// Two tabs of one browser profile share one connection (Web Locks + BroadcastChannel): both
// show every message; when the tab holding it closes, the other takes over and misses nothing.
import { describe, expect, it } from 'vitest';
import { gotIds, pageClient, recorded, sleep, until, useServerAndBrowser } from './harness';

const env = useServerAndBrowser();

describe('tabs of one profile', () => {
  it('share one connection, both show every message, and hand it over when the leader closes', async () => {
    const user = 'tabby';
    const room = 'room-tabs';
    await env.server.inner('create_conversation', { conversation_id: room, conversation_type: 1, members: [user, 'sender'] });
    const context = await env.browser.newContext();
    const first = await context.newPage();
    const second = await context.newPage();
    await first.goto(`${env.server.url}/demo/`);
    await second.goto(`${env.server.url}/demo/`);
    await pageClient(first, { user, tabs: 'shared' });
    await until('the first tab connected', async () => (await recorded(first)).state === 'connected');
    await pageClient(second, { user, tabs: 'shared' });
    await until('the second tab to learn the state', async () => (await recorded(second)).state === 'connected');
    expect((await recorded(first)).leader).toBe(true);
    expect((await recorded(second)).leader).toBe(false);
    expect((await recorded(second)).transport).toBe('ws');
    expect(await env.server.connections(user)).toBe(1);

    const sent = await env.server.sendMany(room, 'sender', 'shared', 20);
    for (const page of [first, second]) {
      await until('every message in both tabs', async () => (await gotIds(page, room)).length === sent.length);
    }
    expect(await gotIds(first, room)).toEqual(sent);
    expect(await gotIds(second, room)).toEqual(sent);

    // The leader's tab goes while messages are being sent: the other opens the connection
    // from the last cursor it was relayed and misses none of them.
    const sending = env.server.sendMany(room, 'sender', 'around-handover', 20);
    await sleep(50);
    await first.close();
    await until('the second tab to lead', async () => {
      const r = await recorded(second);
      return r.leader && r.state === 'connected';
    });
    const more = [...(await sending), ...(await env.server.sendMany(room, 'sender', 'after-handover', 10))];
    await until('the rest', async () => (await gotIds(second, room)).length >= sent.length + more.length);
    await sleep(500);
    expect(await gotIds(second, room)).toEqual([...sent, ...more]);
    await until('one connection', async () => (await env.server.connections(user)) === 1, 10_000);
    await context.close();
  });
});
