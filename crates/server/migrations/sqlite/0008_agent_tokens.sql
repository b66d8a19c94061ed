-- Keys the server keeps for itself, shared by replicas: the key agent
-- tokens are signed with (agent tokens themselves are never stored).
CREATE TABLE server_secrets (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
