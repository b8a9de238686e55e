"""A receiver's tasks, persisted in sync.db: per folder the version applied and the current task
(so a task survives a restart and resumes), plus the last finished tasks (`p2pnode sync tasks`)."""

from __future__ import annotations

import sqlite3

import attrs

from .. import codec
from ..errors import DecodeError
from ..platform.db import Database
from .documents import TaskInfo

KEEP_HISTORY = 50  # finished tasks kept per folder


@attrs.frozen
class FolderTasks:
    applied_index_id: int = 0
    applied_seq: int = 0
    task: TaskInfo | None = None


class TaskStore:
    def __init__(self, db: Database):
        self.db = db

    async def load(self) -> dict[str, FolderTasks]:
        rows = await self.db.fetchall("SELECT folder, applied_index_id, applied_seq, task FROM tasks")
        out = {}
        for folder, index_id, seq, blob in rows:
            task = None
            if isinstance(blob, bytes):
                try:
                    task = TaskInfo.from_dict(codec.decode_map(blob, "sync task"))
                except DecodeError:
                    task = None  # a damaged row: the folder is checked again from scratch
            out[str(folder)] = FolderTasks(int(index_id), int(seq), task)
        return out

    async def save(self, folder: str, state: FolderTasks) -> None:
        blob = codec.encode(state.task.to_dict()) if state.task is not None else None
        await self.db.execute(
            "INSERT INTO tasks (folder, applied_index_id, applied_seq, task) VALUES (?,?,?,?) ON CONFLICT(folder) DO UPDATE "
            "SET applied_index_id = excluded.applied_index_id, applied_seq = excluded.applied_seq, task = excluded.task",
            (folder, state.applied_index_id, state.applied_seq, blob),
        )

    async def finish(self, folder: str, task: TaskInfo) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO task_history (folder, task_id, task) VALUES (?,?,?)", (folder, task.id, codec.encode(task.to_dict())))
            conn.execute(
                "DELETE FROM task_history WHERE folder = ? AND id NOT IN (SELECT id FROM task_history WHERE folder = ? "
                "ORDER BY id DESC LIMIT ?)", (folder, folder, KEEP_HISTORY))

        await self.db.write(write)

    async def history(self, folder: str | None = None, limit: int = 200) -> list[tuple[str, TaskInfo]]:
        sql = "SELECT folder, task FROM task_history" + (" WHERE folder = ?" if folder else "") + " ORDER BY id DESC LIMIT ?"
        params = (folder, limit) if folder else (limit,)
        out = []
        for name, blob in await self.db.fetchall(sql, params):
            try:
                out.append((str(name), TaskInfo.from_dict(codec.decode_map(blob, "sync task"))))
            except DecodeError:
                continue
        return out

    async def forget(self, folder: str) -> None:
        await self.db.execute("DELETE FROM tasks WHERE folder = ?", (folder,))
