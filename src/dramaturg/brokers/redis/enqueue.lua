-- Enqueues one message as Dramatiq's dispatch script does (the body in <queue>.msgs under
-- its Redis id, the id at the tail of <queue>), without the rest of that script: no
-- heartbeat for the sending process, which is no worker and claims nothing. A heartbeat
-- that stops when the sender falls quiet makes every worker take the sender for dead and
-- look for its claims (see recovery.py).
-- KEYS: queue list, queue bodies; ARGV: Redis id, body.
redis.call("hset", KEYS[2], ARGV[1], ARGV[2])
redis.call("rpush", KEYS[1], ARGV[1])
return 1
